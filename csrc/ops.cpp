// The extension module `varlen_kernels._C` and the `varlen_kernels` library.
// Schemas are in csrc/op_schemas.h; backends register their kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; fake (meta) kernels and
// autograd live in varlen_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

#ifndef VK_SOURCE_HASH
#define VK_SOURCE_HASH "unknown"
#endif
#ifndef VK_TORCH_VERSION
#define VK_TORCH_VERSION "unknown"
#endif

// `import varlen_kernels._C` loads the shared library, which runs the
// registrations below; the module itself only carries build information.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "SOURCE_HASH", VK_SOURCE_HASH);
  PyModule_AddStringConstant(m, "TORCH_VERSION", VK_TORCH_VERSION);
#ifdef VK_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}

TORCH_LIBRARY(varlen_kernels, m) { varlen::define_ops(m); }
