#include "emu.h"
#include "gen/cam_kernels.cu"
