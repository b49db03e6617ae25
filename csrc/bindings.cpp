// mixer_fast._C: the CPU kernels for Python, with no torch at build time.
//
// A tensor crosses as a tuple (data_ptr, dtype name, shape, strides in elements) or None; every shape,
// stride and dtype is checked here, against the others, before a pointer is touched, and a mismatch is a
// ValueError / TypeError naming the argument, what was expected and what was given. The GIL is released
// while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "mixer_cpu.h"

namespace py = pybind11;
using mixer_cpu::DType;

namespace {

struct Ref {
  uintptr_t ptr = 0;
  std::string dtype;
  std::vector<int64_t> shape, strides;
  bool present = false;
};

// Built with std::to_string, not iostreams: the first ostringstream of a process touches the C++ locale,
// and a segfault at exactly that point (the first shape error raised) was seen once on a host where other
// extensions had loaded their own C++ runtime first (cause not established; this removes the dependency).
std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  o += s.size() == 1 ? ",)" : ")";
  return o;
}

Ref to_ref(const char* name, const py::object& obj) {
  Ref r;
  if (obj.is_none()) return r;
  auto t = obj.cast<py::tuple>();
  if (t.size() != 4) throw py::value_error(std::string(name) + ": expected (data_ptr, dtype, shape, strides) or None");
  r.ptr = t[0].cast<uintptr_t>();
  r.dtype = t[1].cast<std::string>();
  r.shape = t[2].cast<std::vector<int64_t>>();
  r.strides = t[3].cast<std::vector<int64_t>>();
  r.present = true;
  if (r.shape.size() != r.strides.size())
    throw py::value_error(std::string(name) + ": shape and strides differ in length");
  return r;
}

void expect_shape(const char* name, const Ref& r, const std::vector<int64_t>& shape, const char* meaning) {
  if (r.present && r.shape != shape)
    throw py::value_error(std::string(name) + ": expected shape " + meaning + " = " + shape_str(shape) + ", got " +
                          shape_str(r.shape));
}

void expect_contiguous(const char* name, const Ref& r) {
  if (!r.present) return;
  int64_t expected = 1;
  for (size_t i = r.shape.size(); i-- > 0;) {
    if (r.shape[i] != 1 && r.strides[i] != expected)
      throw py::value_error(std::string(name) + ": expected a contiguous tensor, got strides " + shape_str(r.strides) +
                            " for shape " + shape_str(r.shape));
    expected *= r.shape[i];
  }
}

DType dtype_of(const Ref& x) {
  if (x.dtype == "float32") return DType::f32;
  if (x.dtype == "bfloat16") return DType::bf16;
  throw py::type_error("x: the cpu backend supports float32 and bfloat16, got " + x.dtype);
}

const void* ptr(const Ref& r) { return r.present ? reinterpret_cast<const void*>(r.ptr) : nullptr; }

void run(const std::string& op, py::object x_, py::object out_, py::object nw_, py::object nb_, py::object w1_,
         py::object b1_, py::object w2_, py::object b2_, py::object scale_, py::object ss_, double eps,
         bool layernorm, bool gelu_tanh, int threads, bool reference) {
  if (op != "token_mixing" && op != "channel_mixing")
    throw py::value_error("op: expected 'token_mixing' or 'channel_mixing', got '" + op + "'");
  const bool token = op == "token_mixing";
  Ref x = to_ref("x", x_), out = to_ref("out", out_), nw = to_ref("norm_weight", nw_), nb = to_ref("norm_bias", nb_),
      w1 = to_ref("fc1_weight", w1_), b1 = to_ref("fc1_bias", b1_), w2 = to_ref("fc2_weight", w2_),
      b2 = to_ref("fc2_bias", b2_), scale = to_ref("scale", scale_), ss = to_ref("sample_scale", ss_);
  if (!x.present || !out.present || !w1.present) throw py::value_error("x, out and fc1_weight are required");
  if (x.shape.size() != 3) throw py::value_error("x: expected a 3-D tensor (B, S, C), got shape " + shape_str(x.shape));
  if (!token && !w2.present) throw py::value_error("fc2_weight: channel mixing needs fc2_weight, got None");
  const DType t = dtype_of(x);
  const int64_t B = x.shape[0], S = x.shape[1], C = x.shape[2];
  const int64_t n_in = token ? S : C;
  if (w1.shape.size() != 2) throw py::value_error("fc1_weight: expected a 2-D (out, in) weight, got " + shape_str(w1.shape));
  const int64_t D = w1.shape[0];
  expect_shape("out", out, {B, S, C}, "(B, S, C)");
  expect_shape("fc1_weight", w1, {D, n_in}, token ? "(D, S)" : "(D, C)");
  expect_shape("norm_weight", nw, {C}, "(C,)");
  expect_shape("norm_bias", nb, {C}, "(C,)");
  expect_shape("fc1_bias", b1, {D}, "(D,)");
  expect_shape("scale", scale, {C}, "(C,)");
  expect_shape("sample_scale", ss, {B}, "(B,)");
  if (w2.present) {
    expect_shape("fc2_weight", w2, {n_in, D}, token ? "(S, D)" : "(C, D)");
    expect_shape("fc2_bias", b2, {n_in}, token ? "(S,)" : "(C,)");
  } else {
    expect_shape("fc1_weight", w1, {S, S}, "(S, S) when fc2_weight is None");
    if (b2.present) throw py::value_error("fc2_bias: expected None when fc2_weight is None");
  }
  const std::pair<const char*, const Ref*> same_dtype[] = {{"out", &out}, {"norm_weight", &nw}, {"norm_bias", &nb},
                                                           {"fc1_weight", &w1}, {"fc1_bias", &b1}, {"fc2_weight", &w2},
                                                           {"fc2_bias", &b2}, {"scale", &scale}};
  for (const auto& [name, r] : same_dtype) {
    if (r->present && r->dtype != x.dtype)
      throw py::type_error(std::string(name) + ": expected dtype " + x.dtype + " (x's), got " + r->dtype);
    if (r != &x) expect_contiguous(name, *r);
  }
  if (ss.present && ss.dtype != "float32")
    throw py::type_error("sample_scale: expected float32, got " + ss.dtype);
  expect_contiguous("sample_scale", ss);
  if (threads < 1) throw py::value_error("threads: expected at least 1, got " + std::to_string(threads));

  mixer_cpu::MixArgs a;
  a.dtype = t;
  a.x = ptr(x);
  a.B = B, a.S = S, a.C = C;
  a.sxb = x.strides[0], a.sxs = x.strides[1], a.sxc = x.strides[2];
  a.out = reinterpret_cast<void*>(out.ptr);
  a.norm_w = ptr(nw), a.norm_b = ptr(nb), a.w1 = ptr(w1), a.b1 = ptr(b1), a.w2 = ptr(w2), a.b2 = ptr(b2);
  a.D = D;
  a.scale = ptr(scale);
  a.sample_scale = static_cast<const float*>(ptr(ss));
  a.eps = static_cast<float>(eps);
  a.layernorm = layernorm, a.gelu_tanh = gelu_tanh, a.threads = threads;
  py::gil_scoped_release release;
  if (token)
    reference ? mixer_cpu::token_mixing_forward_reference(a) : mixer_cpu::token_mixing_forward(a);
  else
    reference ? mixer_cpu::channel_mixing_forward_reference(a) : mixer_cpu::channel_mixing_forward(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixer_fast's CPU kernels (csrc/): fused token and channel mixing forward";
  m.def("forward", &run, py::arg("op"), py::arg("x"), py::arg("out"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("scale"),
        py::arg("sample_scale"), py::arg("eps"), py::arg("layernorm"), py::arg("gelu_tanh"), py::arg("threads"),
        py::arg("reference") = false,
        "out = op(x, ...): each tensor a (data_ptr, dtype, shape, strides) tuple or None; reference=True runs the "
        "plain loops (the test oracle)");
  m.def("isa", &mixer_cpu::isa, "the micro-kernel family in use: avx512_bf16, avx512, avx2 or portable");
  m.def("force_isa", &mixer_cpu::force_isa, py::arg("name"),
        "pin a micro-kernel family the CPU supports ('' = automatic); False if unknown or unsupported");
  m.def("native_bf16_matmul", &mixer_cpu::native_bf16_matmul,
        "whether the CPU has AVX512-BF16 or AMX-BF16 (PyTorch's bf16 matmuls then outrun these kernels)");
  m.def("workspace_bytes", &mixer_cpu::workspace_bytes, "bytes of scratch kept between calls");
  m.def("free_workspace", &mixer_cpu::free_workspace, "release the scratch kept between calls");
}
