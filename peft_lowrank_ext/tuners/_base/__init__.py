"""What every method of the plugin shares: config, tuner, additive layer, quantized bases, registration."""
