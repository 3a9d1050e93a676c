"""lqc.runtime: packed weight formats and the implementations of lqc's ops."""

from lqc.runtime.quantization import hadamard, qlinear  # noqa: F401  (register the implementations of lqc::hadamard, lqc::qlinear)
from lqc.runtime.structural import moe, neuron_routing  # noqa: F401  (register lqc::moe_ffn's and lqc::keep_top_neurons' implementations)
from lqc.runtime.quantization.formats import FORMATS, QuantizedWeight
