#include "emu.h"
#include "gen/danet_cuda.cuh"
using namespace danet_cuda;
static View3 mk(const void* p, const int64_t* s, int dt) {
  View3 v; v.data = p; if (s) { v.sb = s[0]; v.sc = s[1]; v.sn = s[2]; } v.dtype = (DType)dt; return v;
}
extern "C" {
int emu_pam_forward(const int64_t* sz, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                    const void* v, const int64_t* vs, int dt, const void* x, const int64_t* xs, int xdt,
                    const float* gamma, void* o, int odt, float* lse, void* y, int ydt, int tf32,
                    double scale) {
  PamForwardParams p;  // sz = (B, Cq, Cv, Nq, Nk)
  p.B = sz[0]; p.Cq = sz[1]; p.Cv = sz[2]; p.Nq = sz[3]; p.Nk = sz[4]; p.scale = scale;
  p.q = mk(q, qs, dt); p.k = mk(k, ks, dt); p.v = mk(v, vs, dt); p.x = mk(x, xs, xdt);
  p.gamma = gamma; p.o = o; p.lse = lse; p.y = y; p.dtype = (DType)dt; p.o_dtype = (DType)odt; p.y_dtype = (DType)ydt;
  p.allow_tf32 = tf32;
  return (int)pam_forward(p, nullptr);
}
static PamBackwardParams pam_bwd(const int64_t* sz, const void* dy, const int64_t* dys, int dydt,
    const void* dym, const int64_t* dyms, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
    const void* v, const int64_t* vs, const void* o, const int64_t* os, int odt, const float* lse,
    const float* gamma, void* dq, void* dk, void* dv, float* dgamma, void* ws, int dt, int tf32,
    double scale) {
  PamBackwardParams p;
  p.B = sz[0]; p.Cq = sz[1]; p.Cv = sz[2]; p.Nq = sz[3]; p.Nk = sz[4]; p.scale = scale;
  p.dy = mk(dy, dys, dydt); p.dy_mma = mk(dym, dyms, dt); p.q = mk(q, qs, dt); p.k = mk(k, ks, dt);
  p.v = mk(v, vs, dt); p.o = mk(o, os, odt); p.lse = lse; p.gamma = gamma; p.dq = dq; p.dk = dk; p.dv = dv;
  p.dgamma = dgamma; p.workspace = ws; p.dtype = (DType)dt; p.allow_tf32 = tf32;
  return p;
}
size_t emu_pam_ws(const int64_t* sz) {
  PamBackwardParams p; p.B = sz[0]; p.Cq = sz[1]; p.Cv = sz[2]; p.Nq = sz[3]; p.Nk = sz[4];
  return pam_backward_workspace_bytes(p);
}
int emu_pam_backward(const int64_t* sz, const void* dy, const int64_t* dys, int dydt,
    const void* dym, const int64_t* dyms, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
    const void* v, const int64_t* vs, const void* o, const int64_t* os, int odt, const float* lse,
    const float* gamma, void* dq, void* dk, void* dv, float* dgamma, void* ws, int dt, int tf32,
    double scale) {
  return (int)pam_backward(pam_bwd(sz, dy, dys, dydt, dym, dyms, q, qs, k, ks, v, vs, o, os, odt, lse, gamma,
                                   dq, dk, dv, dgamma, ws, dt, tf32, scale), nullptr);
}
static CamForwardParams cam_f(const int64_t* sz, const void* x, const int64_t* xs, int dt, const float* gamma,
    int paper, void* o, float* attn, void* y, int ydt, void* ws, int tf32) {
  CamForwardParams p; p.B = sz[0]; p.C = sz[1]; p.N = sz[2]; p.x = mk(x, xs, dt); p.gamma = gamma; p.paper = paper;
  p.o = o; p.attn = attn; p.y = y; p.workspace = ws; p.dtype = (DType)dt; p.y_dtype = (DType)ydt; p.allow_tf32 = tf32;
  return p;
}
size_t emu_cam_fwd_ws(const int64_t* sz, int dt) {
  return cam_forward_workspace_bytes(cam_f(sz, nullptr, nullptr, dt, nullptr, 0, nullptr, nullptr, nullptr, 0, nullptr, 0));
}
int emu_cam_forward(const int64_t* sz, const void* x, const int64_t* xs, int dt, const float* gamma,
    int paper, void* o, float* attn, void* y, int ydt, void* ws, int tf32) {
  return (int)cam_forward(cam_f(sz, x, xs, dt, gamma, paper, o, attn, y, ydt, ws, tf32), nullptr);
}
static CamBackwardParams cam_b(const int64_t* sz, const void* dy, const int64_t* dys, int dydt, const void* dym,
    const int64_t* dyms, const void* x, const int64_t* xs, const float* attn, const void* o, const int64_t* os,
    int odt, const float* gamma, int paper, void* dx, float* dgamma, void* ws, int dt, int tf32) {
  CamBackwardParams p; p.B = sz[0]; p.C = sz[1]; p.N = sz[2];
  p.dy = mk(dy, dys, dydt); p.dy_mma = mk(dym, dyms, dt); p.x = mk(x, xs, dt); p.attn = attn;
  p.o = mk(o, os, odt); p.gamma = gamma; p.paper = paper; p.dx = dx; p.dgamma = dgamma; p.workspace = ws;
  p.dtype = (DType)dt; p.allow_tf32 = tf32;
  return p;
}
size_t emu_cam_bwd_ws(const int64_t* sz, int dt) {
  return cam_backward_workspace_bytes(cam_b(sz, nullptr, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr,
      nullptr, nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, dt, 0));
}
int emu_cam_backward(const int64_t* sz, const void* dy, const int64_t* dys, int dydt, const void* dym,
    const int64_t* dyms, const void* x, const int64_t* xs, const float* attn, const void* o, const int64_t* os,
    int odt, const float* gamma, int paper, void* dx, float* dgamma, void* ws, int dt, int tf32) {
  return (int)cam_backward(cam_b(sz, dy, dys, dydt, dym, dyms, x, xs, attn, o, os, odt, gamma, paper, dx, dgamma,
                                 ws, dt, tf32), nullptr);
}
long emu_collectives() { return emu::n_collectives; }
}
