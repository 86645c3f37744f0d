// Native CPU routing plan: a stable counting sort of tokens by modality id, O(T) where
// torch.sort is O(T log T). Returns (perm int64 [T], counts int64 [M]).
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> group_by_modality(const torch::Tensor& modality, int64_t num_modalities) {
  TORCH_CHECK(modality.device().is_cpu(), "group_by_modality: modality must be a CPU tensor");
  TORCH_CHECK(modality.dim() == 1, "group_by_modality: modality must be 1-D, got ", modality.dim(), "-D");
  TORCH_CHECK(num_modalities > 0, "group_by_modality: num_modalities must be positive");
  auto ids = modality.to(torch::kInt64).contiguous();
  const int64_t T = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  auto counts = torch::zeros({num_modalities}, torch::kInt64);
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < num_modalities, "group_by_modality: modality id ", id[t],
                " at token ", t, " is outside [0, ", num_modalities, ")");
    ++count[id[t]];
  }
  std::vector<int64_t> next(num_modalities, 0);
  for (int64_t m = 1; m < num_modalities; ++m) next[m] = next[m - 1] + count[m - 1];
  auto perm = torch::empty({T}, torch::kInt64);
  int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) p[next[id[t]]++] = t;
  return {perm, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "omni-core native CPU operators";
  m.def("group_by_modality", &group_by_modality, "stable counting sort of tokens by modality id",
        pybind11::arg("modality"), pybind11::arg("num_modalities"));
}
