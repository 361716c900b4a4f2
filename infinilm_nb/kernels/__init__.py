"""Hand-written Numba CUDA kernels, one file per family, each with its launchers.

``reference.py`` is the NumPy specification every launcher is tested against. Import the kernel
modules through :func:`infinilm_nb.backend.get_backend`, which sets the simulator up first when needed.
"""
