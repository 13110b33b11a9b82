"""The real-kernel lab: a released LUO kernel built from Debian's source and booted under QEMU.

``source``  fetches the newest ``linux-source-7.N`` through a private apt configuration;
``build``   builds the bzImage and the kernel's liveupdate selftests, cached by (version, config);
``vm``      boots that kernel with the host's root over 9p, runs a job across kexecs, returns its
            status and keeps the serial log; ``rootfs`` builds the Debian sid root for systemd 262.

This package is test infrastructure: it imports nothing from ``luo_agent`` and ``luo_agent`` never
imports it.
"""
