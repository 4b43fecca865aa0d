"""The experiment harnesses: `tether demo`, `tether bench` and `tether sweep`. They call the core (config, data,
regularizers, reference, trainer, run, evaluate); the core never imports them."""
