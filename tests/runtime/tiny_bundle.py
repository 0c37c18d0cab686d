"""What the runtime tests' shared bundle (``conftest.compiled``) is compiled with."""

#: the upscaling factor of the tiny user network compiled for the runtime tests
SCALE = 2
