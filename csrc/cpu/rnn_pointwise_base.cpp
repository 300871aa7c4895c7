// rnn_pointwise.h for any CPU (ATen's portable vectors).
#define CPU_CAPABILITY DEFAULT
#define VK_CPU_NS base
#include "rnn_pointwise.h"
