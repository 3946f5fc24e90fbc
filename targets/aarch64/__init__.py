"""aarch64 cross-compilation and emulation: toolchain, qemu-user sysroot, the emulated runner."""
