// One decode step of a pre-norm transformer layer in one call: the ~12 operator calls the Python block
// makes per layer (norms, the four products, rope + cache write, attention, activation, residual adds)
// cost more in dispatch than in arithmetic when a step holds a few rows (~75 us a layer against ~30 us of
// work for SmolLM2-135M on 2 Zen 4 cores). Nothing new is computed here: the same kernels run in the same
// order on the same buffers, so the result is bit-identical to the Python block's (tests assert it).
//
//   h = rms_norm(x) * attn_norm
//   q = rope_store(qkv(h))                      k and v of each row written to the cache
//   a = attend_cells(q)                         each row against the cells its sequence set may see
//   x = x + [post_attn_norm](wo(a))
//   h = rms_norm(x) * ffn_norm
//   x = x + [post_ffn_norm](down(act(gate) * up))   act: SiLU, or GELU (tanh) for Gemma
//
// A linear is given as its runs (the parts stored in one format, see models/base.py's Linear): one weight
// tensor per run (repacked: qmatmul_packed's layout) and three ints per run in `spec` (ggml type, output
// rows, activation levels).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

// the kernels of qmatmul.cpp, attention.cpp and rowwise.cpp
at::Tensor qmatmul_packed(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t n_out, int64_t levels);
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& rot, const c10::optional<at::Tensor>& q_norm,
                      const c10::optional<at::Tensor>& k_norm, double eps, at::Tensor k_cache, at::Tensor v_cache,
                      const at::Tensor& cells, int64_t n_head);
void attend_cells(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::TensorList rows,
                  at::TensorList cells, at::TensorList mask, double scale, double softcap, at::Tensor out);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor gated(const at::Tensor& gate_up, bool gelu);

namespace {

// x (T, in) -> (T, out): the runs' products side by side
at::Tensor linear(const at::Tensor& x, at::TensorList w, at::IntArrayRef spec) {
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < w.size(); ++i) outs.push_back(qmatmul_packed(x, w[i], spec[3 * i], spec[3 * i + 1], spec[3 * i + 2]));
  return outs.size() == 1 ? outs[0] : at::cat(outs, 1);
}

// a + b for two contiguous fp32 tensors of one shape: at::add's dispatch and iterator cost ~2 us for the few
// hundred values of a decode row, more than the adding
at::Tensor add_rows(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  TORCH_CHECK(ac.sizes() == bc.sizes() && ac.scalar_type() == at::kFloat && bc.scalar_type() == at::kFloat,
              "decode_layer: residual and update must be float32 of one shape");
  at::Tensor y = at::empty_like(ac);
  const float *ap = ac.data_ptr<float>(), *bp = bc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0, n = ac.numel(); i < n; ++i) yp[i] = ap[i] + bp[i];
  return y;
}

// A layer's weights and settings, registered once (decode_layer_new, at the layer's first decode step) and
// named by an id: a step then passes 9 arguments instead of 28. Each argument of an operator call costs
// Python-side checks and a conversion, which made the call ~15 of the ~18 us a small layer's step took. (An
// id, not a torch custom class: passing a custom class object costs a thrown and caught C++ exception.)
struct DecodeLayer {
  at::Tensor attn_norm;
  std::vector<at::Tensor> qkv_w;
  std::vector<int64_t> qkv_spec;
  c10::optional<at::Tensor> qkv_bias, q_norm, k_norm;
  std::vector<at::Tensor> wo_w;
  std::vector<int64_t> wo_spec;
  c10::optional<at::Tensor> attn_post_norm;
  at::Tensor ffn_norm;
  std::vector<at::Tensor> gate_up_w;
  std::vector<int64_t> gate_up_spec;
  std::vector<at::Tensor> down_w;
  std::vector<int64_t> down_spec;
  c10::optional<at::Tensor> ffn_post_norm;
  double eps, scale, softcap;
  int64_t n_head;
  bool gelu;
};

// by id; never destroyed (its tensors must not outlive torch at exit: NativeLayer's finalizers empty it)
std::mutex layers_mutex;
auto* const layers = new std::unordered_map<int64_t, std::shared_ptr<const DecodeLayer>>();
int64_t next_layer_id = 1;

}  // namespace

int64_t decode_layer_new(const at::Tensor& attn_norm, at::TensorList qkv_w, at::IntArrayRef qkv_spec,
                         const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& q_norm,
                         const c10::optional<at::Tensor>& k_norm, at::TensorList wo_w, at::IntArrayRef wo_spec,
                         const c10::optional<at::Tensor>& attn_post_norm, const at::Tensor& ffn_norm,
                         at::TensorList gate_up_w, at::IntArrayRef gate_up_spec, at::TensorList down_w,
                         at::IntArrayRef down_spec, const c10::optional<at::Tensor>& ffn_post_norm, double eps,
                         double scale, double softcap, int64_t n_head, bool gelu) {
  const auto check = [](at::TensorList w, at::IntArrayRef spec) {
    TORCH_CHECK(!w.empty() && spec.size() == 3 * w.size(), "decode_layer_new: a linear needs 3 spec ints per run");
  };
  check(qkv_w, qkv_spec);
  check(wo_w, wo_spec);
  check(gate_up_w, gate_up_spec);
  check(down_w, down_spec);
  auto layer = std::make_shared<const DecodeLayer>(DecodeLayer{
      attn_norm, qkv_w.vec(), qkv_spec.vec(), qkv_bias, q_norm, k_norm, wo_w.vec(), wo_spec.vec(), attn_post_norm,
      ffn_norm, gate_up_w.vec(), gate_up_spec.vec(), down_w.vec(), down_spec.vec(), ffn_post_norm, eps, scale,
      softcap, n_head, gelu});
  std::lock_guard<std::mutex> lock(layers_mutex);
  (*layers)[next_layer_id] = std::move(layer);
  return next_layer_id++;
}

// drops the registry's hold on a layer's weights (a step still running on it keeps its own)
void decode_layer_free(int64_t id) {
  std::lock_guard<std::mutex> lock(layers_mutex);
  layers->erase(id);
}

at::Tensor decode_layer(const at::Tensor& x, int64_t layer_id, const at::Tensor& rot,
                        at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& cells, at::TensorList set_rows,
                        at::TensorList set_cells, at::TensorList set_masks) {
  TORCH_CHECK(set_rows.size() == set_cells.size() && set_rows.size() == set_masks.size() && !set_rows.empty(),
              "decode_layer: sequence sets need rows, cells and a mask each");
  std::shared_ptr<const DecodeLayer> layer;
  {
    std::lock_guard<std::mutex> lock(layers_mutex);
    const auto it = layers->find(layer_id);
    TORCH_CHECK(it != layers->end(), "decode_layer: no layer with id ", layer_id, " (decode_layer_new gives ids)");
    layer = it->second;
  }
  const DecodeLayer& L = *layer;
  const double eps = L.eps;
  at::Tensor h = rms_norm(x, L.attn_norm, eps);
  at::Tensor qkv = linear(h, L.qkv_w, L.qkv_spec);
  if (L.qkv_bias.has_value()) qkv = qkv + *L.qkv_bias;
  const at::Tensor q = rope_store(qkv, rot, L.q_norm, L.k_norm, eps, k_cache, v_cache, cells, L.n_head);
  at::Tensor attn = at::empty_like(q);  // (T, n_head, hd)
  attend_cells(q, k_cache, v_cache, set_rows, set_cells, set_masks, L.scale, L.softcap, attn);
  at::Tensor out = linear(attn.view({x.size(0), -1}), L.wo_w, L.wo_spec);
  if (L.attn_post_norm.has_value()) out = rms_norm(out, *L.attn_post_norm, eps);
  const at::Tensor mid = add_rows(x, out);
  h = rms_norm(mid, L.ffn_norm, eps);
  out = linear(gated(linear(h, L.gate_up_w, L.gate_up_spec), L.gelu), L.down_w, L.down_spec);
  if (L.ffn_post_norm.has_value()) out = rms_norm(out, *L.ffn_post_norm, eps);
  return add_rows(mid, out);
}

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) {
  m.def("decode_layer_new", &decode_layer_new);
  m.def("decode_layer_free", &decode_layer_free);
  m.def(
      "decode_layer(Tensor x, int layer, Tensor rot, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cells, "
      "Tensor[] set_rows, Tensor[] set_cells, Tensor[] set_masks) -> Tensor",
      &decode_layer);
}
