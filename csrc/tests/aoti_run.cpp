// Loads an AOTInductor package of a model that uses danet_ops (made with
// torch._inductor.aoti_compile_and_package, e.g. `python -m models.export --format aoti`) and runs it
// from C++ with no Python. The package calls the fused ops through the dispatcher, so the ops
// library must be loaded first: this program links libdanet_ops (CMake target `danet_ops`) with
// --no-as-needed, whose static initialisers register danet_ops::* (a program can also dlopen the
// Python package's danet_ops/_C*.so, which has no Python dependency).
//
//   danet_ops_aoti_run model.pt2 B C H W
// Input: x[i] = sin(0.001 * i) in [B, C, H, W] (deterministic, to compare with Python); prints each
// output's shape, sum and max |value|.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s model.pt2 B C H W\n", argv[0]);
    return 2;
  }
  std::vector<int64_t> shape;
  for (int i = 2; i < 6; ++i) shape.push_back(std::atoll(argv[i]));
  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  int64_t numel = shape[0] * shape[1] * shape[2] * shape[3];
  at::Tensor x = at::sin(at::arange(numel, at::kDouble) * 0.001).to(at::kFloat).reshape(shape);
  std::vector<at::Tensor> outputs = loader.run({x});
  for (size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor& o = outputs[i];
    std::printf("output %zu shape %s sum %.9e maxabs %.9e\n", i, c10::str(o.sizes()).c_str(),
                o.sum().item<double>(), o.abs().max().item<double>());
  }
  return 0;
}
