#include "emu.h"
#include "gen/pam_kernels.cu"
