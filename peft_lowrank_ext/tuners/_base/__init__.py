"""What every method of the plugin shares: config, tuner, additive layer, supported targets, quantized bases, registration."""
