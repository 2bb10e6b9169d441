"""Helpers of the command-line tools, not of the model or the contract.

- `synth`: the synthetic hospitals and the synthetic public corpus (stand-ins, said so);
- `cli_opts`: the shared shape of a command's failure and its interrupt handling;
- `figures`: matplotlib headless, one way to save a figure.
"""
