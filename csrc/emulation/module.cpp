// The emulation build's extension module (varlen_kernels._C_emu, or
// _C_emu_asan under AddressSanitizer): the op schemas again, in the
// `varlen_kernels_emu` library, implemented on the CPU key by the CUDA sources
// compiled with g++ (see setup.py), plus the executor's settings.
// varlen_kernels.testing.emulate_cuda() routes the varlen_kernels ops here.
#include <Python.h>
#include <torch/library.h>

#include "emulation/cuda_on_cpu.h"
#include "op_schemas.h"

#ifndef VK_EMU_MODULE
#define VK_EMU_MODULE _C_emu
#endif
#define VK_CAT2(a, b) a##b
#define VK_CAT(a, b) VK_CAT2(a, b)
#define VK_STR2(a) #a
#define VK_STR(a) VK_STR2(a)
#ifndef VK_SOURCE_HASH
#define VK_SOURCE_HASH "unknown"
#endif

namespace {

// set_thread_order(order: 0 forward, 1 reverse, 2 random, seed: int)
PyObject* set_thread_order(PyObject*, PyObject* args) {
  int order = 0;
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "iK", &order, &seed)) return nullptr;
  if (order < 0 || order > 2) {
    PyErr_Format(PyExc_ValueError, "order must be 0 (forward), 1 (reverse) or 2 (random), got %d",
                 order);
    return nullptr;
  }
  vk_emu::set_thread_order(vk_emu::Order(order), seed);
  Py_RETURN_NONE;
}

// set_sm_count(n) -> previous: the emulated SM count that bounds cooperative grids.
PyObject* set_sm_count(PyObject*, PyObject* args) {
  int n = 0;
  if (!PyArg_ParseTuple(args, "i", &n)) return nullptr;
  if (n < 1) {
    PyErr_Format(PyExc_ValueError, "sm_count must be >= 1, got %d", n);
    return nullptr;
  }
  const int old = vk_emu::device_limits().sm_count;
  vk_emu::device_limits().sm_count = n;
  return PyLong_FromLong(old);
}

PyMethodDef methods[] = {
    {"set_thread_order", set_thread_order, METH_VARARGS, "Thread order of the emulated kernels."},
    {"set_sm_count", set_sm_count, METH_VARARGS, "Emulated SM count; returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* VK_CAT(PyInit_, VK_EMU_MODULE)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, VK_STR(VK_EMU_MODULE), nullptr, -1,
                                   methods};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "SOURCE_HASH", VK_SOURCE_HASH);
#if defined(__SANITIZE_ADDRESS__)
  PyModule_AddIntConstant(m, "ASAN", 1);
#else
  PyModule_AddIntConstant(m, "ASAN", 0);
#endif
  return m;
}

TORCH_LIBRARY(varlen_kernels_emu, m) { varlen::define_ops(m); }
