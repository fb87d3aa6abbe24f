"""One module per quantization method: offline (calibrate/convert) and runtime (QuantLinear)."""
