// rnn_pointwise.h and loss_rows.h for any CPU (ATen's portable vectors).
#define CPU_CAPABILITY DEFAULT
#define VK_CPU_NS base
#include "rnn_pointwise.h"
#include "panel_gemm.h"
#include "loss_rows.h"
