// kernels.cu built by the host compiler, its kernels run on the CPU by cuda_emu.h: the `emulated`
// device, which checks the CUDA kernels themselves against the twin where there is no GPU.
#include "kernels.cu"
