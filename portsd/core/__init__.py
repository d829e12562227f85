"""The pure core: values in, values out; no file, network, subprocess or clock."""
