"""The model: what it is (specs), loading it, and running it on frames (tiles, resize, device, fused kernels).

Takes plain values and raises plain exceptions (ValueError, FileNotFoundError, DeviceOutOfMemory);
the app turns them into job errors. Modules are imported one by one: `engine.specs` needs no torch.
"""
