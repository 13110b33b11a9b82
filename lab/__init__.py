"""The real-kernel lab: a released LUO kernel built from Debian's source and booted under QEMU.

``source``  fetches the newest ``linux-source-7.N`` through a private apt configuration;
``build``   builds the bzImage and the kernel's liveupdate selftests, cached by (version, config);
``vm``      boots that kernel with the host's root over 9p, runs a job across kexecs, returns its
            status and keeps the serial log; ``rootfs`` builds the Debian sid root for systemd 262.
``liveupdate`` runs a whole live update in that VM: ``deb`` (the package), ``guest_setup`` (what
            a boot gets before PID 1), ``scenarios`` (the shell jobs), ``results`` (what a run
            showed), ``in_vm`` (the commands the jobs run inside the VM).

This package is test infrastructure.  One module, ``in_vm``, imports the project (``luo_agent``
and ``tests/kernel/luo_raw.py``), and only inside the commands that run in the VM: the host side
never loads it.  ``luo_agent`` never imports ``lab`` (``tests/unit/test_layers.py``).
"""
