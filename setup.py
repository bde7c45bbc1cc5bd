"""The compiled relay's and tunnel core's build (everything else about the package is in pyproject.toml).

Optional: on a machine without a C compiler the install goes on without it, and the splice
relays in Python (src/fleetgate/dataplane/fastpath.py says when each is used).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fleetgate.dataplane._relay",
            ["src/fleetgate/dataplane/_relay.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"],
            optional=True,
        ),
        Extension(
            "fleetgate.dataplane._tunnel",
            ["src/fleetgate/dataplane/_tunnel.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"],
            optional=True,
        ),
    ]
)
