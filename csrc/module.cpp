// The Python module aspd_kernels._C: empty on purpose. Loading the shared library runs the static registrations
// of ops.cpp (torch.ops.aspd.cuda_*); Python only needs an importable module, so no pybind11 and no
// torch/extension.h (the heaviest header) anywhere in the build.
#include <Python.h>

static PyModuleDef aspd_module = {
    PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of aspd_kernels, registered as torch.ops.aspd.cuda_*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&aspd_module); }
