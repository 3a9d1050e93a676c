"""What structural passes leave behind: MoE dispatch (lqc::moe_ffn), dropped-layer bookkeeping."""
