// The Python module llmcore._cpu: checks arrays, allocates outputs, releases the GIL and calls the
// kernel table chosen for this CPU. The only file that includes pybind11.
//
// The checks here are the last line of defence (a direct call to llmcore._cpu must never read
// or write out of bounds); friendlier messages come from python/llmcore/ops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dispatch.h"
#include "kernels.h"
#include "output_pool.h"

namespace py = pybind11;
using llmcore::kernels;
using Shape = std::vector<py::ssize_t>;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// "(2, 3)", "(5,)": a shape as Python prints it. (Appended piece by piece: GCC 12 warned about
// a memcpy bound in `const char* + std::string` here.)
std::string shape_text(const py::ssize_t* dims, size_t n) {
    std::string s = "(";
    for (size_t i = 0; i < n; ++i) {
        if (i) s += ", ";
        s += std::to_string(dims[i]);
    }
    s += n == 1 ? ",)" : ")";
    return s;
}

std::string shape_str(const py::array& a) { return shape_text(a.shape(), (size_t)a.ndim()); }

void require_dtype(const py::array& a, const char* name, const py::dtype& want, const char* what) {
    if (!a.dtype().equal(want))
        throw py::type_error(std::string(name) + ": expected " + what + ", got " +
                             std::string(py::str(a.dtype())));
}

// A float32 array that a kernel reads as one dense block.
const float* in_f32(const py::array& a, const char* name) {
    require_dtype(a, name, py::dtype::of<float>(), "float32");
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": expected a C-contiguous array");
    return static_cast<const float*>(a.data());
}

// A float32 array that a kernel updates in place.
float* inout_f32(py::array& a, const char* name) {
    in_f32(a, name);
    if (!a.writeable()) fail(std::string(name) + ": expected a writeable array");
    return static_cast<float*>(a.mutable_data());
}

const int64_t* in_i64(const py::array& a, const char* name) {
    require_dtype(a, name, py::dtype::of<int64_t>(), "int64");
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": expected a C-contiguous array");
    return static_cast<const int64_t*>(a.data());
}

void require_ndim(const py::array& a, const char* name, py::ssize_t lo, py::ssize_t hi) {
    if (a.ndim() < lo || a.ndim() > hi)
        fail(std::string(name) + ": expected " + std::to_string(lo) +
             (lo == hi ? "" : " to " + std::to_string(hi)) + " dimensions, got shape " + shape_str(a));
}

void require_shape(const py::array& a, const char* name, const Shape& want) {
    bool same = a.ndim() == (py::ssize_t)want.size();
    for (size_t i = 0; same && i < want.size(); ++i) same = a.shape(i) == want[i];
    if (!same) {
        fail(std::string(name) + ": expected shape " + shape_text(want.data(), want.size()) + ", got " +
             shape_str(a));
    }
}

Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

// An optional float32 input of a known shape: null when it is absent.
const float* optional_in_f32(const std::optional<py::array>& a, const char* name, const Shape& want) {
    if (!a) return nullptr;
    const float* p = in_f32(*a, name);
    require_shape(*a, name, want);
    return p;
}

// Rows of an array viewed as (rows, last axis): the product of every axis but the last (not
// size / last, which is 0 when the last axis is empty although the rows still exist).
int64_t rows_of(const py::array& a) {
    int64_t rows = 1;
    for (py::ssize_t i = 0; i + 1 < a.ndim(); ++i) rows *= a.shape(i);
    return rows;
}

// A new float32 array for a kernel's output. Large ones take their memory from the output pool
// (output_pool.h), whose blocks go back to the pool when NumPy frees the array.
py::array_t<float> empty_f32(const Shape& shape) {
    size_t bytes = sizeof(float);
    for (py::ssize_t d : shape) bytes *= (size_t)d;
    if (bytes < llmcore::pool::kMinBytes) return py::array_t<float>(shape);
    size_t capacity = 0;
    void* block = llmcore::pool::acquire(bytes, &capacity);
    // The array's base capsule owns the block; release() needs the capacity too.
    struct Owner { void* block; size_t capacity; };
    py::capsule base(new Owner{block, capacity}, [](void* p) {
        auto* owner = static_cast<Owner*>(p);
        llmcore::pool::release(owner->block, owner->capacity);
        delete owner;
    });
    return py::array_t<float>(shape, static_cast<float*>(block), base);
}

float* ptr(py::array_t<float>& a) { return a.mutable_data(); }

// Checks that every id lies in [0, limit), except those equal to `except` (ignore_index).
void require_ids_in_range(const int64_t* ids, int64_t n, int64_t limit, const char* name,
                          std::optional<int64_t> except = std::nullopt) {
    for (int64_t i = 0; i < n; ++i) {
        int64_t id = ids[i];
        if ((id < 0 || id >= limit) && !(except && id == *except))
            fail(std::string(name) + ": value " + std::to_string(id) + " at flat index " +
                 std::to_string(i) + " is outside [0, " + std::to_string(limit) + ")");
    }
}

// ---------------------------------------------------------------------------------------------
// matmul and linear

// a (..., M, K) or (..., K, M) when trans_a; b (K, N) / (N, K) or with a's batch dims.
py::array_t<float> matmul(const py::array& a, const py::array& b, bool trans_a, bool trans_b) {
    const float* pa = in_f32(a, "a");
    const float* pb = in_f32(b, "b");
    require_ndim(a, "a", 2, 32);
    require_ndim(b, "b", 2, 32);
    const py::ssize_t nd = a.ndim();
    const int64_t M = trans_a ? a.shape(nd - 1) : a.shape(nd - 2);
    const int64_t K = trans_a ? a.shape(nd - 2) : a.shape(nd - 1);
    const int64_t Kb = trans_b ? b.shape(b.ndim() - 1) : b.shape(b.ndim() - 2);
    const int64_t N = trans_b ? b.shape(b.ndim() - 2) : b.shape(b.ndim() - 1);
    if (K != Kb) fail("b: inner dimensions differ: a gives K=" + std::to_string(K) + ", b gives K=" + std::to_string(Kb));
    const bool shared_b = b.ndim() == 2;
    if (!shared_b) {
        bool same = b.ndim() == nd;
        for (py::ssize_t i = 0; same && i < nd - 2; ++i) same = a.shape(i) == b.shape(i);
        if (!same) fail("b: expected 2 dimensions or the batch dimensions of a " + shape_str(a) + ", got " + shape_str(b));
    }
    int64_t batch = 1;
    Shape out_shape;
    for (py::ssize_t i = 0; i < nd - 2; ++i) { batch *= a.shape(i); out_shape.push_back(a.shape(i)); }
    out_shape.push_back(M);
    out_shape.push_back(N);
    auto c = empty_f32(out_shape);
    float* pc = ptr(c);
    {
        py::gil_scoped_release nogil;
        if (shared_b && !trans_a)  // the batch folds into M: one large GEMM
            kernels().gemm(pc, pa, pb, nullptr, nullptr, 1, batch * M, N, K, false, trans_b, 0, 0, 0, false);
        else
            kernels().gemm(pc, pa, pb, nullptr, nullptr, batch, M, N, K, trans_a, trans_b, M * K,
                           shared_b ? 0 : K * N, M * N, false);
    }
    return c;
}

// x (..., in) @ weight (out, in)^T + bias (out,) + residual (..., out)
py::array_t<float> linear(const py::array& x, const py::array& weight, const std::optional<py::array>& bias,
                          const std::optional<py::array>& residual) {
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    require_ndim(x, "x", 1, 32);
    require_ndim(weight, "weight", 2, 2);
    const int64_t in = weight.shape(1), out = weight.shape(0);
    if (x.shape(x.ndim() - 1) != in)
        fail("x: last axis must match weight's in_features " + std::to_string(in) + ", got shape " + shape_str(x));
    const float* pbias = optional_in_f32(bias, "bias", {(py::ssize_t)out});
    Shape out_shape = shape_of(x);
    out_shape.back() = out;
    const float* pres = optional_in_f32(residual, "residual", out_shape);
    const int64_t rows = rows_of(x);
    auto y = empty_f32(out_shape);
    float* py_ = ptr(y);
    {
        py::gil_scoped_release nogil;
        kernels().gemm(py_, px, pw, pbias, pres, 1, rows, out, in, false, true, 0, 0, 0, false);
    }
    return y;
}

// (dx, dweight, dbias or None) for y = x @ weight^T + bias. With dweight (and dbias) given, the
// gradients are added into them, as a training step accumulates a parameter's gradient, and they
// are returned: no fresh array and no separate pass to add it.
py::tuple linear_backward(const py::array& dy, const py::array& x, const py::array& weight, bool has_bias,
                          const std::optional<py::array>& dweight, const std::optional<py::array>& dbias) {
    const float* pdy = in_f32(dy, "dy");
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    require_ndim(weight, "weight", 2, 2);
    require_ndim(x, "x", 1, 32);
    const int64_t in = weight.shape(1), out = weight.shape(0);
    if (x.shape(x.ndim() - 1) != in)
        fail("x: last axis must match weight's in_features " + std::to_string(in) + ", got shape " + shape_str(x));
    Shape dy_shape = shape_of(x);
    dy_shape.back() = out;
    require_shape(dy, "dy", dy_shape);
    const int64_t rows = rows_of(x);
    const bool accumulate = dweight.has_value();
    if (dbias.has_value() != (accumulate && has_bias))
        fail("dweight, dbias: accumulate both gradients or neither (dbias only with has_bias)");
    // The gradients to add into, or fresh ones to write.
    auto grad = [accumulate](const std::optional<py::array>& given, const char* name, Shape shape) {
        py::array a = accumulate ? *given : py::array(empty_f32(shape));
        float* p = inout_f32(a, name);
        require_shape(a, name, shape);
        return std::pair{a, p};
    };
    auto [dw, pdw] = grad(dweight, "dweight", {(py::ssize_t)out, (py::ssize_t)in});
    py::object db = py::none();
    float* pdb = nullptr;
    if (has_bias) std::tie(db, pdb) = grad(dbias, "dbias", {(py::ssize_t)out});
    auto dx = empty_f32(shape_of(x));
    float* pdx = ptr(dx);
    {
        py::gil_scoped_release nogil;
        // dx (rows, in) = dy (rows, out) @ weight (out, in)
        kernels().gemm(pdx, pdy, pw, nullptr, nullptr, 1, rows, in, out, false, false, 0, 0, 0, false);
        // dweight (out, in) (+)= dy^T (out, rows) @ x (rows, in)
        kernels().gemm(pdw, pdy, px, nullptr, nullptr, 1, out, in, rows, true, false, 0, 0, 0, accumulate);
        if (pdb) kernels().bias_backward(pdb, pdy, rows, out, accumulate);
    }
    return py::make_tuple(dx, dw, db);
}

// ---------------------------------------------------------------------------------------------
// row-wise operations over the last axis

py::array_t<float> softmax_forward(const py::array& x) {
    const float* px = in_f32(x, "x");
    require_ndim(x, "x", 1, 32);
    auto y = empty_f32(shape_of(x));
    float* py_ = ptr(y);
    const int64_t cols = x.shape(x.ndim() - 1), rows = rows_of(x);
    {
        py::gil_scoped_release nogil;
        if (cols > 0) kernels().softmax_forward(py_, px, rows, cols);
    }
    return y;
}

py::array_t<float> softmax_backward(const py::array& dy, const py::array& y) {
    const float* pdy = in_f32(dy, "dy");
    const float* py_ = in_f32(y, "y");
    require_ndim(y, "y", 1, 32);
    require_shape(dy, "dy", shape_of(y));
    auto dx = empty_f32(shape_of(y));
    float* pdx = ptr(dx);
    const int64_t cols = y.shape(y.ndim() - 1), rows = rows_of(y);
    {
        py::gil_scoped_release nogil;
        if (cols > 0) kernels().softmax_backward(pdx, pdy, py_, rows, cols);
    }
    return dx;
}

// Checks x (..., C) and a weight-like (C,) vector; returns (rows, C).
std::pair<int64_t, int64_t> norm_dims(const py::array& x, const py::array& weight, const char* wname) {
    require_ndim(x, "x", 1, 32);
    const int64_t C = x.shape(x.ndim() - 1);
    if (C == 0) fail("x: the normalised (last) axis must not be empty");
    require_shape(weight, wname, {(py::ssize_t)C});
    return {rows_of(x), C};
}

Shape without_last(const py::array& x) { return Shape(x.shape(), x.shape() + x.ndim() - 1); }

py::tuple rmsnorm_forward(const py::array& x, const py::array& weight, float eps) {
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    auto [rows, C] = norm_dims(x, weight, "weight");
    auto y = empty_f32(shape_of(x));
    auto rstd = empty_f32(without_last(x));
    float *py_ = ptr(y), *pr = ptr(rstd);
    {
        py::gil_scoped_release nogil;
        kernels().rmsnorm_forward(py_, pr, px, pw, rows, C, eps);
    }
    return py::make_tuple(y, rstd);
}

// (dx, dweight); dx includes residual (the gradient through the norm's skip connection) if given.
py::tuple rmsnorm_backward(const py::array& dy, const py::array& x, const py::array& weight, const py::array& rstd,
                           const std::optional<py::array>& residual) {
    const float* pdy = in_f32(dy, "dy");
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    const float* pr = in_f32(rstd, "rstd");
    auto [rows, C] = norm_dims(x, weight, "weight");
    require_shape(dy, "dy", shape_of(x));
    require_shape(rstd, "rstd", without_last(x));
    const float* pres = optional_in_f32(residual, "residual", shape_of(x));
    auto dx = empty_f32(shape_of(x));
    auto dw = empty_f32({(py::ssize_t)C});
    float *pdx = ptr(dx), *pdw = ptr(dw);
    {
        py::gil_scoped_release nogil;
        kernels().rmsnorm_backward(pdx, pdw, pdy, px, pw, pr, pres, rows, C);
    }
    return py::make_tuple(dx, dw);
}

py::tuple layernorm_forward(const py::array& x, const py::array& weight, const py::array& bias, float eps) {
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    const float* pb = in_f32(bias, "bias");
    auto [rows, C] = norm_dims(x, weight, "weight");
    require_shape(bias, "bias", {(py::ssize_t)C});
    auto y = empty_f32(shape_of(x));
    auto mean = empty_f32(without_last(x));
    auto rstd = empty_f32(without_last(x));
    float *py_ = ptr(y), *pm = ptr(mean), *pr = ptr(rstd);
    {
        py::gil_scoped_release nogil;
        kernels().layernorm_forward(py_, pm, pr, px, pw, pb, rows, C, eps);
    }
    return py::make_tuple(y, mean, rstd);
}

// (dx, dweight, dbias); dx includes residual if given, as in rmsnorm_backward.
py::tuple layernorm_backward(const py::array& dy, const py::array& x, const py::array& weight,
                             const py::array& mean, const py::array& rstd,
                             const std::optional<py::array>& residual) {
    const float* pdy = in_f32(dy, "dy");
    const float* px = in_f32(x, "x");
    const float* pw = in_f32(weight, "weight");
    const float* pm = in_f32(mean, "mean");
    const float* pr = in_f32(rstd, "rstd");
    auto [rows, C] = norm_dims(x, weight, "weight");
    require_shape(dy, "dy", shape_of(x));
    require_shape(mean, "mean", without_last(x));
    require_shape(rstd, "rstd", without_last(x));
    const float* pres = optional_in_f32(residual, "residual", shape_of(x));
    auto dx = empty_f32(shape_of(x));
    auto dw = empty_f32({(py::ssize_t)C});
    auto db = empty_f32({(py::ssize_t)C});
    float *pdx = ptr(dx), *pdw = ptr(dw), *pdb = ptr(db);
    {
        py::gil_scoped_release nogil;
        kernels().layernorm_backward(pdx, pdw, pdb, pdy, px, pw, pm, pr, pres, rows, C);
    }
    return py::make_tuple(dx, dw, db);
}

// ---------------------------------------------------------------------------------------------
// elementwise

py::array_t<float> gelu_forward(const py::array& x, bool approximate_tanh) {
    const float* px = in_f32(x, "x");
    auto y = empty_f32(shape_of(x));
    float* py_ = ptr(y);
    const int64_t n = x.size();
    {
        py::gil_scoped_release nogil;
        kernels().gelu_forward(py_, px, n, approximate_tanh);
    }
    return y;
}

py::array_t<float> gelu_backward(const py::array& dy, const py::array& x, bool approximate_tanh) {
    const float* pdy = in_f32(dy, "dy");
    const float* px = in_f32(x, "x");
    require_shape(dy, "dy", shape_of(x));
    auto dx = empty_f32(shape_of(x));
    float* pdx = ptr(dx);
    const int64_t n = x.size();
    {
        py::gil_scoped_release nogil;
        kernels().gelu_backward(pdx, pdy, px, n, approximate_tanh);
    }
    return dx;
}

// ---------------------------------------------------------------------------------------------
// cross-entropy, embedding, AdamW

std::pair<int64_t, int64_t> cross_entropy_dims(const py::array& logits, const py::array& targets,
                                               const int64_t* pt, int64_t ignore_index) {
    require_ndim(logits, "logits", 2, 2);
    const int64_t N = logits.shape(0), V = logits.shape(1);
    if (V == 0) fail("logits: the vocabulary (last) axis must not be empty");
    require_shape(targets, "targets", {(py::ssize_t)N});
    require_ids_in_range(pt, N, V, "targets", ignore_index);
    return {N, V};
}

py::tuple cross_entropy_forward(const py::array& logits, const py::array& targets, int64_t ignore_index) {
    const float* pl = in_f32(logits, "logits");
    const int64_t* pt = in_i64(targets, "targets");
    auto [N, V] = cross_entropy_dims(logits, targets, pt, ignore_index);
    auto loss = empty_f32({(py::ssize_t)N});
    auto lse = empty_f32({(py::ssize_t)N});
    float *ploss = ptr(loss), *plse = ptr(lse);
    {
        py::gil_scoped_release nogil;
        kernels().cross_entropy_forward(ploss, plse, pl, pt, N, V, ignore_index);
    }
    return py::make_tuple(loss, lse);
}

py::array_t<float> cross_entropy_backward(const py::array& dloss, const py::array& logits,
                                          const py::array& targets, const py::array& lse, int64_t ignore_index) {
    const float* pd = in_f32(dloss, "dloss");
    const float* pl = in_f32(logits, "logits");
    const int64_t* pt = in_i64(targets, "targets");
    const float* plse = in_f32(lse, "lse");
    auto [N, V] = cross_entropy_dims(logits, targets, pt, ignore_index);
    require_shape(dloss, "dloss", {(py::ssize_t)N});
    require_shape(lse, "lse", {(py::ssize_t)N});
    auto dlogits = empty_f32(shape_of(logits));
    float* pdl = ptr(dlogits);
    {
        py::gil_scoped_release nogil;
        kernels().cross_entropy_backward(pdl, pd, pl, pt, plse, N, V, ignore_index);
    }
    return dlogits;
}

py::array_t<float> embedding_forward(const py::array& weight, const py::array& ids) {
    const float* pw = in_f32(weight, "weight");
    const int64_t* pi = in_i64(ids, "ids");
    require_ndim(weight, "weight", 2, 2);
    const int64_t V = weight.shape(0), C = weight.shape(1);
    require_ids_in_range(pi, ids.size(), V, "ids");
    Shape out_shape = shape_of(ids);
    out_shape.push_back(C);
    auto out = empty_f32(out_shape);
    float* po = ptr(out);
    const int64_t n = ids.size();
    {
        py::gil_scoped_release nogil;
        kernels().embedding_forward(po, pw, pi, n, C);
    }
    return out;
}

py::array_t<float> embedding_backward(const py::array& dout, const py::array& ids, int64_t vocab_size) {
    const float* pd = in_f32(dout, "dout");
    const int64_t* pi = in_i64(ids, "ids");
    if (vocab_size < 0) fail("vocab_size: expected a number >= 0, got " + std::to_string(vocab_size));
    if (dout.ndim() != ids.ndim() + 1) fail("dout: expected the shape of ids plus a channel axis, got " + shape_str(dout));
    Shape want = shape_of(ids);
    want.push_back(dout.shape(dout.ndim() - 1));
    require_shape(dout, "dout", want);
    require_ids_in_range(pi, ids.size(), vocab_size, "ids");
    const int64_t C = want.back(), n = ids.size();
    auto dw = empty_f32({(py::ssize_t)vocab_size, (py::ssize_t)C});
    float* pdw = ptr(dw);
    {
        py::gil_scoped_release nogil;
        kernels().embedding_backward(pdw, pd, pi, n, vocab_size, C);
    }
    return dw;
}

// One tensor's arrays for the AdamW kernel, after checking them (`where` names the tensor in
// messages, e.g. "params[3]").
llmcore::AdamwTensor adamw_tensor(py::array& param, const py::array& grad, py::array& m, py::array& v,
                                  float weight_decay, const std::string& where) {
    const std::string grad_name = "grad" + where, m_name = "m" + where, v_name = "v" + where;
    llmcore::AdamwTensor t{};
    t.param = inout_f32(param, ("param" + where).c_str());
    t.grad = in_f32(grad, grad_name.c_str());
    t.m = inout_f32(m, m_name.c_str());
    t.v = inout_f32(v, v_name.c_str());
    const Shape shape = shape_of(param);
    require_shape(grad, grad_name.c_str(), shape);
    require_shape(m, m_name.c_str(), shape);
    require_shape(v, v_name.c_str(), shape);
    t.n = param.size();
    t.weight_decay = weight_decay;
    return t;
}

void require_step(int64_t step) {
    if (step < 1) fail("step: expected a count starting at 1, got " + std::to_string(step));
}

void adamw_step(py::array& param, const py::array& grad, py::array& m, py::array& v, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    const llmcore::AdamwTensor t = adamw_tensor(param, grad, m, v, weight_decay, "");
    require_step(step);
    py::gil_scoped_release nogil;
    kernels().adamw_step(&t, 1, lr, beta1, beta2, eps, step, 1.0f);
}

// Every tensor of a model in one call: lists of equal length, tensor i's weight decay
// weight_decays[i], every gradient multiplied by grad_scale.
void adamw_step_multi(std::vector<py::array> params, const std::vector<py::array>& grads,
                      std::vector<py::array> ms, std::vector<py::array> vs, float lr, float beta1,
                      float beta2, float eps, const std::vector<float>& weight_decays, int64_t step,
                      float grad_scale) {
    const size_t n = params.size();
    if (grads.size() != n || ms.size() != n || vs.size() != n || weight_decays.size() != n)
        fail("params, grads, m, v, weight_decays: expected lists of one length, got " + std::to_string(n) + ", " +
             std::to_string(grads.size()) + ", " + std::to_string(ms.size()) + ", " + std::to_string(vs.size()) +
             ", " + std::to_string(weight_decays.size()));
    require_step(step);
    std::vector<llmcore::AdamwTensor> tensors;
    for (size_t i = 0; i < n; ++i)
        tensors.push_back(adamw_tensor(params[i], grads[i], ms[i], vs[i], weight_decays[i],
                                       "[" + std::to_string(i) + "]"));
    py::gil_scoped_release nogil;
    kernels().adamw_step(tensors.data(), (int64_t)n, lr, beta1, beta2, eps, step, grad_scale);
}

// sum of x^2 over every element of every array (C-contiguous float32), in float64.
double sum_of_squares(const std::vector<py::array>& arrays) {
    std::vector<const float*> ptrs;
    std::vector<int64_t> sizes;
    for (size_t i = 0; i < arrays.size(); ++i) {
        ptrs.push_back(in_f32(arrays[i], ("arrays[" + std::to_string(i) + "]").c_str()));
        sizes.push_back(arrays[i].size());
    }
    py::gil_scoped_release nogil;
    return kernels().sum_of_squares(ptrs.data(), sizes.data(), (int64_t)ptrs.size());
}

// ---------------------------------------------------------------------------------------------
// attention

// A float32 (B, L, heads, D) array whose last axis is contiguous: returns its pointer and its
// element strides (batch, seq, head), after checking they are whole elements.
const float* strided_bshd(const py::array& a, const char* name, int64_t strides[3]) {
    require_dtype(a, name, py::dtype::of<float>(), "float32");
    require_ndim(a, name, 4, 4);
    if (a.size() == 0) {  // NumPy gives empty arrays arbitrary strides; nothing will be read
        for (int i = 0; i < 3; ++i) strides[i] = 0;
        return static_cast<const float*>(a.data());
    }
    if (a.shape(3) > 1 && a.strides(3) != (py::ssize_t)sizeof(float))
        fail(std::string(name) + ": the last (head dimension) axis must be contiguous");
    for (int i = 0; i < 3; ++i) {
        if (a.strides(i) % (py::ssize_t)sizeof(float) != 0)
            fail(std::string(name) + ": strides must be whole float32 elements");
        strides[i] = a.strides(i) / (py::ssize_t)sizeof(float);
    }
    return static_cast<const float*>(a.data());
}

llmcore::AttentionShape attention_shape(const py::array& q, const py::array& k, const py::array& v,
                                        const float** pq, const float** pk, const float** pv) {
    llmcore::AttentionShape s{};
    *pq = strided_bshd(q, "q", s.q_strides);
    *pk = strided_bshd(k, "k", s.k_strides);
    *pv = strided_bshd(v, "v", s.v_strides);
    s.B = q.shape(0); s.T = q.shape(1); s.H = q.shape(2); s.D = q.shape(3);
    s.S = k.shape(1); s.Hkv = k.shape(2);
    require_shape(k, "k", {(py::ssize_t)s.B, (py::ssize_t)s.S, (py::ssize_t)s.Hkv, (py::ssize_t)s.D});
    require_shape(v, "v", shape_of(k));
    if (s.Hkv == 0 || s.H % s.Hkv != 0)
        fail("k: the number of key/value heads (" + std::to_string(s.Hkv) +
             ") must divide the number of query heads (" + std::to_string(s.H) + ")");
    return s;
}

const float* alibi_ptr(const std::optional<py::array>& slopes, int64_t H) {
    if (!slopes) return nullptr;
    const float* p = in_f32(*slopes, "alibi_slopes");
    require_shape(*slopes, "alibi_slopes", {(py::ssize_t)H});
    return p;
}

// A RoPE table: (rows, D/2) complex64, C-contiguous, read as (cos, sin) float pairs.
const float* rope_table(const py::array& table, const char* name, int64_t rows, int64_t D) {
    require_dtype(table, name, py::dtype("complex64"), "complex64");
    if (!(table.flags() & py::array::c_style)) fail(std::string(name) + ": expected a C-contiguous array");
    require_shape(table, name, {(py::ssize_t)rows, (py::ssize_t)(D / 2)});
    return static_cast<const float*>(table.data());
}

// RoPE's table for attention: (S, D/2), D even.
const float* rope_ptr(const std::optional<py::array>& rope, const llmcore::AttentionShape& s) {
    if (!rope) return nullptr;
    if (s.D % 2) fail("rope: RoPE rotates pairs, so the head dimension D must be even, got " + std::to_string(s.D));
    return rope_table(*rope, "rope", s.S, s.D);
}

void require_causal_fits(bool causal, const llmcore::AttentionShape& s) {
    if (causal && s.S < s.T)
        fail("k: causal attention needs at least as many keys as queries (S=" + std::to_string(s.S) +
             " < T=" + std::to_string(s.T) + ")");
}

py::tuple attention_forward(const py::array& q, const py::array& k, const py::array& v, bool causal,
                            float scale, std::optional<py::array> alibi_slopes,
                            std::optional<py::array> rope) {
    const float *pq, *pk, *pv;
    auto s = attention_shape(q, k, v, &pq, &pk, &pv);
    require_causal_fits(causal, s);
    const float* pa = alibi_ptr(alibi_slopes, s.H);
    const float* pr = rope_ptr(rope, s);
    auto out = empty_f32(shape_of(q));
    auto lse = empty_f32({(py::ssize_t)s.B, (py::ssize_t)s.H, (py::ssize_t)s.T});
    float *po = ptr(out), *pl = ptr(lse);
    {
        py::gil_scoped_release nogil;
        if (out.size() > 0) kernels().attention_forward(po, pl, pq, pk, pv, s, causal, scale, pa, pr);
    }
    return py::make_tuple(out, lse);
}

// A gradient output of attention_backward: the caller's (B, L, heads, D) view with a contiguous
// last axis (e.g. a slice of a fused QKV gradient), or a fresh contiguous array.
float* grad_out(std::optional<py::array>& given, py::array& result, const char* name, const Shape& shape,
                int64_t strides[3]) {
    if (given) {
        if (!given->writeable()) fail(std::string(name) + ": expected a writeable array");
        require_shape(*given, name, shape);
        result = *given;
    } else {
        result = empty_f32(shape);
    }
    return const_cast<float*>(strided_bshd(result, name, strides));
}

// (dq, dk, dv), written into the given arrays when passed. Whether they overlap each other or the
// inputs is checked by llmcore.ops (np.shares_memory): an overlap gives wrong values, never an
// access outside the arrays.
py::tuple attention_backward(const py::array& dout, const py::array& q, const py::array& k,
                             const py::array& v, const py::array& out, const py::array& lse,
                             bool causal, float scale, std::optional<py::array> alibi_slopes,
                             std::optional<py::array> dq_out, std::optional<py::array> dk_out,
                             std::optional<py::array> dv_out, std::optional<py::array> rope) {
    const float *pq, *pk, *pv;
    auto s = attention_shape(q, k, v, &pq, &pk, &pv);
    require_causal_fits(causal, s);
    const float* pdo = in_f32(dout, "dout");
    const float* po = in_f32(out, "out");
    const float* pl = in_f32(lse, "lse");
    require_shape(dout, "dout", shape_of(q));
    require_shape(out, "out", shape_of(q));
    require_shape(lse, "lse", {(py::ssize_t)s.B, (py::ssize_t)s.H, (py::ssize_t)s.T});
    const float* pa = alibi_ptr(alibi_slopes, s.H);
    const float* pr = rope_ptr(rope, s);
    py::array dq, dk, dv;
    float* pdq = grad_out(dq_out, dq, "dq", shape_of(q), s.dq_strides);
    float* pdk = grad_out(dk_out, dk, "dk", shape_of(k), s.dk_strides);
    float* pdv = grad_out(dv_out, dv, "dv", shape_of(v), s.dv_strides);
    {
        py::gil_scoped_release nogil;
        if (dq.size() + dk.size() > 0)
            kernels().attention_backward(pdq, pdk, pdv, pdo, pq, pk, pv, po, pl, s, causal, scale, pa, pr);
    }
    return py::make_tuple(dq, dk, dv);
}

// ---------------------------------------------------------------------------------------------
// runtime configuration

int get_num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void set_num_threads(int n) {
    if (n < 1) fail("num_threads: expected a count >= 1, got " + std::to_string(n));
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

// ---------------------------------------------------------------------------------------------
// rope

// The lowest and one-past-highest byte a (B, L, heads, D) view touches (elements >= 0 strides).
std::pair<const char*, const char*> byte_span(const py::array& a, const float* p, const int64_t strides[3]) {
    const char* lo = reinterpret_cast<const char*>(p);
    int64_t last = a.shape(3) - 1;
    for (int i = 0; i < 3; ++i) last += (a.shape(i) - 1) * strides[i];
    return {lo, lo + (last + 1) * (int64_t)sizeof(float)};
}

// out = x rotated by rot (or its conjugate); x and out (B, T, H, D) views with a contiguous last
// axis, rot (T, D/2) complex64 C-contiguous. Returns out.
py::array rope(const py::array& x, const py::array& rot, py::array& out, bool conjugate) {
    llmcore::RopeShape s{};
    const float* px = strided_bshd(x, "x", s.x_strides);
    float* po = const_cast<float*>(strided_bshd(out, "out", s.out_strides));
    if (!out.writeable()) fail("out: expected a writeable array");
    require_shape(out, "out", shape_of(x));
    s.B = x.shape(0); s.T = x.shape(1); s.H = x.shape(2); s.D = x.shape(3);
    if (s.D % 2) fail("x: RoPE rotates pairs, so the last axis must be even, got shape " + shape_str(x));
    const float* pr = rope_table(rot, "rot", s.T, s.D);
    for (int i = 0; i < 3; ++i)
        if (s.x_strides[i] < 0 || s.out_strides[i] < 0) fail("x, out: negative strides are not supported");
    if (x.size() == 0) return out;
    const auto [xlo, xhi] = byte_span(x, px, s.x_strides);
    const auto [olo, ohi] = byte_span(out, po, s.out_strides);
    const bool same = px == po && std::equal(s.x_strides, s.x_strides + 3, s.out_strides);
    if (!same && olo < xhi && xlo < ohi) fail("out: must be x itself or not overlap it");
    {
        // (scoped: returning `out` copies a handle, which must happen with the GIL held)
        py::gil_scoped_release nogil;
        kernels().rope(po, px, pr, s, conjugate);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "llmcore CPU kernels (float32). Use llmcore.ops for the checked public API.";

    m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false);
    m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
          py::arg("residual") = py::none());
    m.def("linear_backward", &linear_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("has_bias"),
          py::arg("dweight") = py::none(), py::arg("dbias") = py::none());
    m.def("softmax_forward", &softmax_forward, py::arg("x"));
    m.def("softmax_backward", &softmax_backward, py::arg("dy"), py::arg("y"));
    m.def("rmsnorm_forward", &rmsnorm_forward, py::arg("x"), py::arg("weight"), py::arg("eps"));
    m.def("rmsnorm_backward", &rmsnorm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
          py::arg("residual") = py::none());
    m.def("layernorm_forward", &layernorm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
    m.def("layernorm_backward", &layernorm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
          py::arg("mean"), py::arg("rstd"), py::arg("residual") = py::none());
    m.def("gelu_forward", &gelu_forward, py::arg("x"), py::arg("approximate_tanh"));
    m.def("gelu_backward", &gelu_backward, py::arg("dy"), py::arg("x"), py::arg("approximate_tanh"));
    m.def("cross_entropy_forward", &cross_entropy_forward, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"));
    m.def("cross_entropy_backward", &cross_entropy_backward, py::arg("dloss"), py::arg("logits"),
          py::arg("targets"), py::arg("lse"), py::arg("ignore_index"));
    m.def("embedding_forward", &embedding_forward, py::arg("weight"), py::arg("ids"));
    m.def("embedding_backward", &embedding_backward, py::arg("dout"), py::arg("ids"), py::arg("vocab_size"));
    m.def("adamw_step", &adamw_step, py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"),
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("adamw_step_multi", &adamw_step_multi, py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"),
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decays"),
          py::arg("step"), py::arg("grad_scale"));
    m.def("sum_of_squares", &sum_of_squares, py::arg("arrays"));
    m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal"),
          py::arg("scale"), py::arg("alibi_slopes") = py::none(), py::arg("rope") = py::none());
    m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("out"), py::arg("lse"), py::arg("causal"), py::arg("scale"), py::arg("alibi_slopes") = py::none(),
          py::arg("dq") = py::none(), py::arg("dk") = py::none(), py::arg("dv") = py::none(),
          py::arg("rope") = py::none());

    m.def("rope", &rope, py::arg("x"), py::arg("rot"), py::arg("out"), py::arg("conjugate"));

    m.def("simd", [] { return std::string(kernels().isa); }, "The instruction set of the kernels in use.");
    m.def("supported_simd", &llmcore::supported_isas, "Instruction sets compiled in that this CPU can run.");
    m.def("set_simd", &llmcore::set_isa, py::arg("name"), "Use the kernels compiled for `name`.");
    m.def("empty_cache", &llmcore::pool::empty_cache, "Unmaps the output pool's cached blocks.");
    m.def("pool_stats", [] {
        const auto s = llmcore::pool::stats();
        py::dict d;
        d["cached_bytes"] = s.cached_bytes;
        d["in_use_bytes"] = s.in_use_bytes;
        d["limit_bytes"] = s.limit_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
    }, "The output pool's counters.");
    m.def("set_pool_limit", &llmcore::pool::set_limit, py::arg("bytes"), "Caps the output pool's cached bytes.");
    m.def("get_num_threads", &get_num_threads);
    m.def("set_num_threads", &set_num_threads, py::arg("n"));
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
