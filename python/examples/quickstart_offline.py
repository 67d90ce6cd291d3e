"""The README's Quick Start, verbatim except where the image comes from.

Online the Quick Start pulls ``alpine:latest``; this copy pulls the image
named by its first argument or ``CC_QUICKSTART_IMAGE``, such as the busybox
test image in a registry on loopback:

    python examples/quickstart_offline.py 127.0.0.1:5000/test/busybox:latest

The tests run it against a local registry (tests/test_quickstart.py).
"""

import os
import sys

import crumblecracker as cc

if len(sys.argv) > 1:
    IMAGE = sys.argv[1]
elif os.environ.get("CC_QUICKSTART_IMAGE"):
    IMAGE = os.environ["CC_QUICKSTART_IMAGE"]
else:
    sys.exit(
        "usage: quickstart_offline.py IMAGE (or set CC_QUICKSTART_IMAGE), "
        "e.g. 127.0.0.1:5000/test/busybox:latest"
    )

# --- the Quick Start, with IMAGE for "alpine:latest" -------------------------

# Initialize the library
cc.init()

# Check for hypervisor support
if cc.supports_hypervisor():
    print("Hypervisor available!")
else:
    print("No hypervisor - some features may be limited")

# Query system capabilities
caps = cc.query_capabilities()
print(f"Architecture: {caps.architecture}")

# Pull an image and create an instance
with cc.OCIClient() as client:
    # Pull with progress callback
    def on_progress(p):
        if p.total > 0:
            pct = p.current * 100 // p.total
            print(f"\rDownloading: {pct}%", end="")

    source = client.pull(IMAGE, progress_callback=on_progress)
    print()  # newline after progress

    # Get image config
    config = source.get_config()
    print(f"Image architecture: {config.architecture}")

    # Create and run instance
    options = cc.InstanceOptions(memory_mb=512, cpus=2)
    with cc.Instance(source, options) as inst:
        print(f"Instance ID: {inst.id}")

        # Run a command
        output = inst.command("echo", "Hello from VM!").output()
        print(output.decode())

        # File operations
        inst.write_file("/tmp/test.txt", b"Hello, World!")
        data = inst.read_file("/tmp/test.txt")
        print(f"Read: {data.decode()}")

        # Directory operations
        inst.mkdir("/tmp/mydir")
        for entry in inst.read_dir("/tmp"):
            print(f"  {entry.name} (dir={entry.is_dir})")

# Cleanup
cc.shutdown()
