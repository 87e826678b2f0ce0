// The Python module llmcore._cuda: the CUDA core's mirror of llmcore._cpu (csrc/bindings.cpp).
// Same functions, same arguments, same results, with CuPy arrays in place of NumPy arrays.
//
// Arrays arrive as any object with __cuda_array_interface__ (CuPy's); outputs are allocated by
// calling cupy.empty, so CuPy's memory pool owns every byte; kernels run on CuPy's current
// stream and current device. The checks here are the last line of defence (a direct call to
// llmcore._cuda must never read or write out of bounds): dtypes, shapes, contiguity and id
// ranges. Friendlier messages come from python/llmcore/ops. The only file that includes pybind11.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.cuh"
#include "kernels.cuh"

namespace py = pybind11;
namespace lc = llmcore::cuda;
using Shape = std::vector<int64_t>;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const Shape& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) {
        if (i) out += ", ";
        out += std::to_string(s[i]);
    }
    out += s.size() == 1 ? ",)" : ")";
    return out;
}

// A device array described by __cuda_array_interface__ (version 2 or 3).
struct DeviceArray {
    py::object owner;  // keeps the Python object alive while we hold its pointer
    uintptr_t ptr = 0;
    Shape shape;
    Shape strides;  // in bytes; filled in for C-contiguous arrays too
    std::string typestr;
    bool readonly = false;

    int64_t ndim() const { return (int64_t)shape.size(); }
    int64_t dim(int64_t i) const { return shape[i < 0 ? i + ndim() : i]; }
    int64_t size() const {
        int64_t n = 1;
        for (auto d : shape) n *= d;
        return n;
    }
    int64_t itemsize() const { return std::stoll(typestr.substr(2)); }
    bool c_contiguous() const {
        if (size() == 0) return true;
        int64_t expect = itemsize();
        for (int64_t i = ndim() - 1; i >= 0; --i) {
            if (shape[i] != 1 && strides[i] != expect) return false;
            expect *= shape[i];
        }
        return true;
    }
    // Every axis but the last (the number of rows of a (rows, last) view).
    int64_t rows() const {
        int64_t r = 1;
        for (int64_t i = 0; i + 1 < ndim(); ++i) r *= shape[i];
        return r;
    }
    Shape without_last() const { return Shape(shape.begin(), shape.end() - 1); }
    template <class T> T* data() const { return reinterpret_cast<T*>(ptr); }
};

DeviceArray device_array(const py::handle& obj, const char* name) {
    if (!py::hasattr(obj, "__cuda_array_interface__"))
        throw py::type_error(std::string(name) + ": expected a CuPy array (an object with "
                             "__cuda_array_interface__), got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    py::dict iface = obj.attr("__cuda_array_interface__");
    DeviceArray a;
    a.owner = py::reinterpret_borrow<py::object>(obj);
    py::tuple data = iface["data"];
    a.ptr = data[0].cast<uintptr_t>();
    a.readonly = data[1].cast<bool>();
    for (auto d : iface["shape"].cast<py::tuple>()) a.shape.push_back(d.cast<int64_t>());
    a.typestr = iface["typestr"].cast<std::string>();
    if (iface.contains("mask") && !iface["mask"].is_none()) fail(std::string(name) + ": masked arrays are not supported");
    if (iface.contains("strides") && !iface["strides"].is_none()) {
        for (auto s : iface["strides"].cast<py::tuple>()) a.strides.push_back(s.cast<int64_t>());
    } else {  // None means C-contiguous
        a.strides.assign(a.shape.size(), 0);
        int64_t st = a.itemsize();
        for (int64_t i = a.ndim() - 1; i >= 0; --i) { a.strides[i] = st; st *= a.shape[i]; }
    }
    return a;
}

void require_dtype(const DeviceArray& a, const char* name, const char* typestr, const char* what) {
    // '<' little-endian, '|' not applicable; compare kind and size only.
    if (a.typestr.substr(1) != std::string(typestr).substr(1))
        throw py::type_error(std::string(name) + ": expected " + what + ", got typestr " + a.typestr);
}

// A float32 array that a kernel reads as one dense block.
DeviceArray in_f32(const py::handle& obj, const char* name) {
    DeviceArray a = device_array(obj, name);
    require_dtype(a, name, "<f4", "float32");
    if (!a.c_contiguous()) fail(std::string(name) + ": expected a C-contiguous array");
    return a;
}

DeviceArray inout_f32(const py::handle& obj, const char* name) {
    DeviceArray a = in_f32(obj, name);
    if (a.readonly) fail(std::string(name) + ": expected a writeable array");
    return a;
}

DeviceArray in_i64(const py::handle& obj, const char* name) {
    DeviceArray a = device_array(obj, name);
    require_dtype(a, name, "<i8", "int64");
    if (!a.c_contiguous()) fail(std::string(name) + ": expected a C-contiguous array");
    return a;
}

void require_ndim(const DeviceArray& a, const char* name, int64_t lo, int64_t hi) {
    if (a.ndim() < lo || a.ndim() > hi)
        fail(std::string(name) + ": expected " + std::to_string(lo) +
             (lo == hi ? "" : " to " + std::to_string(hi)) + " dimensions, got shape " + shape_str(a.shape));
}

void require_shape(const DeviceArray& a, const char* name, const Shape& want) {
    if (a.shape != want)
        fail(std::string(name) + ": expected shape " + shape_str(want) + ", got " + shape_str(a.shape));
}

// ---- CuPy glue: allocation, stream, device ---------------------------------------------------

py::module_& cupy() {
    // Never destroyed: a static py::object's destructor would run after the interpreter has
    // finalised, without the GIL, and abort the process at exit.
    static py::module_* mod = new py::module_(py::module_::import("cupy"));
    return *mod;
}

// A new float32 (or other dtype) CuPy array on the current device, from CuPy's memory pool.
DeviceArray empty(const Shape& shape, const char* dtype = "float32") {
    py::tuple t(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) t[i] = py::int_(shape[i]);
    py::object arr = cupy().attr("empty")(t, py::arg("dtype") = dtype);
    return device_array(arr, "output");
}

// Scratch bytes from CuPy's pool (kept alive by the returned array until the call returns;
// CuPy's pool is stream-ordered, so freeing after an asynchronous launch is safe).
DeviceArray workspace(size_t bytes) { return empty({(int64_t)(bytes ? bytes : 1)}, "uint8"); }

// CuPy's current stream, after making CuPy's current device ours: both runtimes share the
// device's primary context, so CuPy's stream handles are valid here.
cudaStream_t current_stream() {
    py::module_ cuda = cupy().attr("cuda");
    int dev = cuda.attr("runtime").attr("getDevice")().cast<int>();
    LLMCORE_CUDA_CHECK(cudaSetDevice(dev));
    return reinterpret_cast<cudaStream_t>(cuda.attr("get_current_stream")().attr("ptr").cast<uintptr_t>());
}

void require_ids_in_range(const DeviceArray& ids, int64_t limit, const char* name, cudaStream_t stream,
                          std::optional<int64_t> except = std::nullopt) {
    if (ids.size() == 0) return;
    DeviceArray ws = workspace(8);
    int64_t bad;
    {
        py::gil_scoped_release nogil;
        bad = lc::first_id_out_of_range(ids.data<const int64_t>(), ids.size(), limit, except.has_value(),
                                        except.value_or(0), ws.data<void>(), stream);
    }
    if (bad >= 0) {
        int64_t value = 0;
        LLMCORE_CUDA_CHECK(cudaMemcpy(&value, ids.data<const int64_t>() + bad, sizeof(value), cudaMemcpyDeviceToHost));
        fail(std::string(name) + ": value " + std::to_string(value) + " at flat index " + std::to_string(bad) +
             " is outside [0, " + std::to_string(limit) + ")");
    }
}

lc::MatmulPrecision g_precision = lc::MatmulPrecision::FP32;

void set_matmul_precision(const std::string& name) {
    if (name == "highest") g_precision = lc::MatmulPrecision::FP32;
    else if (name == "high") g_precision = lc::MatmulPrecision::TF32;
    else if (name == "medium") g_precision = lc::MatmulPrecision::BF16;
    else fail("precision: expected 'highest' (fp32), 'high' (tf32) or 'medium' (bf16), got '" + name + "'");
}

std::string get_matmul_precision() {
    switch (g_precision) {
        case lc::MatmulPrecision::TF32: return "high";
        case lc::MatmulPrecision::BF16: return "medium";
        default: return "highest";
    }
}

// ---- matmul and linear ------------------------------------------------------------------------

py::object matmul(const py::handle& a_obj, const py::handle& b_obj, bool trans_a, bool trans_b) {
    DeviceArray a = in_f32(a_obj, "a"), b = in_f32(b_obj, "b");
    require_ndim(a, "a", 2, 32);
    require_ndim(b, "b", 2, 32);
    const int64_t nd = a.ndim();
    const int64_t M = trans_a ? a.dim(-1) : a.dim(-2), K = trans_a ? a.dim(-2) : a.dim(-1);
    const int64_t Kb = trans_b ? b.dim(-1) : b.dim(-2), N = trans_b ? b.dim(-2) : b.dim(-1);
    if (K != Kb) fail("b: inner dimensions differ: a gives K=" + std::to_string(K) + ", b gives K=" + std::to_string(Kb));
    const bool shared_b = b.ndim() == 2;
    if (!shared_b && (b.ndim() != nd || !std::equal(a.shape.begin(), a.shape.end() - 2, b.shape.begin())))
        fail("b: expected 2 dimensions or the batch dimensions of a " + shape_str(a.shape) + ", got " + shape_str(b.shape));
    Shape out_shape(a.shape.begin(), a.shape.end() - 2);
    int64_t batch = 1;
    for (auto d : out_shape) batch *= d;
    out_shape.push_back(M);
    out_shape.push_back(N);
    DeviceArray c = empty(out_shape);
    cudaStream_t stream = current_stream();
    if (c.size() > 0) {
        py::gil_scoped_release nogil;
        if (shared_b && !trans_a)  // the batch folds into M: one large GEMM
            lc::gemm(c.data<float>(), a.data<float>(), b.data<float>(), nullptr, 1, batch * M, N, K, false,
                     trans_b, 0, 0, 0, false, g_precision, nullptr, 0, stream);
        else
            lc::gemm(c.data<float>(), a.data<float>(), b.data<float>(), nullptr, batch, M, N, K, trans_a,
                     trans_b, M * K, shared_b ? 0 : K * N, M * N, false, g_precision, nullptr, 0, stream);
    }
    return c.owner;
}

std::pair<int64_t, int64_t> linear_dims(const DeviceArray& x, const DeviceArray& weight) {
    require_ndim(x, "x", 1, 32);
    require_ndim(weight, "weight", 2, 2);
    if (x.dim(-1) != weight.dim(1))
        fail("x: last axis must match weight's in_features " + std::to_string(weight.dim(1)) + ", got shape " + shape_str(x.shape));
    return {weight.dim(1), weight.dim(0)};
}

py::object linear(const py::handle& x_obj, const py::handle& w_obj, const py::object& bias_obj) {
    DeviceArray x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight");
    auto [in, out] = linear_dims(x, w);
    const float* pbias = nullptr;
    if (!bias_obj.is_none()) {
        DeviceArray bias = in_f32(bias_obj, "bias");
        require_shape(bias, "bias", {out});
        pbias = bias.data<float>();
    }
    Shape out_shape = x.shape;
    out_shape.back() = out;
    DeviceArray y = empty(out_shape);
    cudaStream_t stream = current_stream();
    if (y.size() > 0) {
        py::gil_scoped_release nogil;
        lc::gemm(y.data<float>(), x.data<float>(), w.data<float>(), pbias, 1, x.rows(), out, in, false, true,
                 0, 0, 0, false, g_precision, nullptr, 0, stream);
    }
    return y.owner;
}

py::tuple linear_backward(const py::handle& dy_obj, const py::handle& x_obj, const py::handle& w_obj, bool has_bias) {
    DeviceArray dy = in_f32(dy_obj, "dy"), x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight");
    auto [in, out] = linear_dims(x, w);
    Shape dy_shape = x.shape;
    dy_shape.back() = out;
    require_shape(dy, "dy", dy_shape);
    const int64_t rows = x.rows();
    DeviceArray dx = empty(x.shape), dw = empty({out, in});
    const size_t dw_ws_bytes = lc::gemm_workspace_bytes(1, out, in, rows, true, false);
    DeviceArray dw_ws = workspace(dw_ws_bytes);
    py::object db = py::none();
    float* pdb = nullptr;
    if (has_bias) {
        DeviceArray b = empty({out});
        pdb = b.data<float>();
        db = b.owner;
    }
    cudaStream_t stream = current_stream();
    {
        py::gil_scoped_release nogil;
        // dx (rows, in) = dy (rows, out) @ weight (out, in)
        if (dx.size() > 0)
            lc::gemm(dx.data<float>(), dy.data<float>(), w.data<float>(), nullptr, 1, rows, in, out, false, false,
                     0, 0, 0, false, g_precision, nullptr, 0, stream);
        // dweight (out, in) = dy^T (out, rows) @ x (rows, in), split over the rows when that fills the GPU
        if (dw.size() > 0)
            lc::gemm(dw.data<float>(), dy.data<float>(), x.data<float>(), nullptr, 1, out, in, rows, true, false,
                     0, 0, 0, false, g_precision, dw_ws.data<void>(), dw_ws_bytes, stream);
        if (pdb && out > 0) lc::bias_backward(pdb, dy.data<float>(), rows, out, stream);
    }
    return py::make_tuple(dx.owner, dw.owner, db);
}

// ---- row-wise operations ---------------------------------------------------------------------

py::object softmax_forward(const py::handle& x_obj) {
    DeviceArray x = in_f32(x_obj, "x");
    require_ndim(x, "x", 1, 32);
    DeviceArray y = empty(x.shape);
    cudaStream_t stream = current_stream();
    if (x.size() > 0) {
        py::gil_scoped_release nogil;
        lc::softmax_forward(y.data<float>(), x.data<float>(), x.rows(), x.dim(-1), stream);
    }
    return y.owner;
}

py::object softmax_backward(const py::handle& dy_obj, const py::handle& y_obj) {
    DeviceArray dy = in_f32(dy_obj, "dy"), y = in_f32(y_obj, "y");
    require_ndim(y, "y", 1, 32);
    require_shape(dy, "dy", y.shape);
    DeviceArray dx = empty(y.shape);
    cudaStream_t stream = current_stream();
    if (y.size() > 0) {
        py::gil_scoped_release nogil;
        lc::softmax_backward(dx.data<float>(), dy.data<float>(), y.data<float>(), y.rows(), y.dim(-1), stream);
    }
    return dx.owner;
}

// Checks x (..., C) and a (C,) vector; returns C.
int64_t norm_channels(const DeviceArray& x, const DeviceArray& weight, const char* wname) {
    require_ndim(x, "x", 1, 32);
    const int64_t C = x.dim(-1);
    if (C == 0) fail("x: the normalised (last) axis must not be empty");
    require_shape(weight, wname, {C});
    return C;
}

py::tuple rmsnorm_forward(const py::handle& x_obj, const py::handle& w_obj, float eps) {
    DeviceArray x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight");
    const int64_t C = norm_channels(x, w, "weight");
    DeviceArray y = empty(x.shape), rstd = empty(x.without_last());
    cudaStream_t stream = current_stream();
    if (x.rows() > 0) {
        py::gil_scoped_release nogil;
        lc::rmsnorm_forward(y.data<float>(), rstd.data<float>(), x.data<float>(), w.data<float>(), x.rows(), C, eps, stream);
    }
    return py::make_tuple(y.owner, rstd.owner);
}

py::tuple rmsnorm_backward(const py::handle& dy_obj, const py::handle& x_obj, const py::handle& w_obj,
                           const py::handle& rstd_obj) {
    DeviceArray dy = in_f32(dy_obj, "dy"), x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight"),
                rstd = in_f32(rstd_obj, "rstd");
    const int64_t C = norm_channels(x, w, "weight"), rows = x.rows();
    require_shape(dy, "dy", x.shape);
    require_shape(rstd, "rstd", x.without_last());
    DeviceArray dx = empty(x.shape), dw = empty({C});
    DeviceArray ws = workspace(lc::rmsnorm_backward_workspace_bytes(rows, C));
    cudaStream_t stream = current_stream();
    {
        py::gil_scoped_release nogil;
        if (rows > 0)
            lc::rmsnorm_backward(dx.data<float>(), dw.data<float>(), dy.data<float>(), x.data<float>(), w.data<float>(),
                                 rstd.data<float>(), rows, C, ws.data<void>(), stream);
        else
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dw.data<void>(), 0, C * sizeof(float), stream));
    }
    return py::make_tuple(dx.owner, dw.owner);
}

py::tuple layernorm_forward(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj, float eps) {
    DeviceArray x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight"), b = in_f32(b_obj, "bias");
    const int64_t C = norm_channels(x, w, "weight");
    require_shape(b, "bias", {C});
    DeviceArray y = empty(x.shape), mean = empty(x.without_last()), rstd = empty(x.without_last());
    cudaStream_t stream = current_stream();
    if (x.rows() > 0) {
        py::gil_scoped_release nogil;
        lc::layernorm_forward(y.data<float>(), mean.data<float>(), rstd.data<float>(), x.data<float>(), w.data<float>(),
                              b.data<float>(), x.rows(), C, eps, stream);
    }
    return py::make_tuple(y.owner, mean.owner, rstd.owner);
}

py::tuple layernorm_backward(const py::handle& dy_obj, const py::handle& x_obj, const py::handle& w_obj,
                             const py::handle& mean_obj, const py::handle& rstd_obj) {
    DeviceArray dy = in_f32(dy_obj, "dy"), x = in_f32(x_obj, "x"), w = in_f32(w_obj, "weight"),
                mean = in_f32(mean_obj, "mean"), rstd = in_f32(rstd_obj, "rstd");
    const int64_t C = norm_channels(x, w, "weight"), rows = x.rows();
    require_shape(dy, "dy", x.shape);
    require_shape(mean, "mean", x.without_last());
    require_shape(rstd, "rstd", x.without_last());
    DeviceArray dx = empty(x.shape), dw = empty({C}), db = empty({C});
    DeviceArray ws = workspace(lc::layernorm_backward_workspace_bytes(rows, C));
    cudaStream_t stream = current_stream();
    {
        py::gil_scoped_release nogil;
        if (rows > 0) {
            lc::layernorm_backward(dx.data<float>(), dw.data<float>(), db.data<float>(), dy.data<float>(), x.data<float>(),
                                   w.data<float>(), mean.data<float>(), rstd.data<float>(), rows, C, ws.data<void>(), stream);
        } else {
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dw.data<void>(), 0, C * sizeof(float), stream));
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(db.data<void>(), 0, C * sizeof(float), stream));
        }
    }
    return py::make_tuple(dx.owner, dw.owner, db.owner);
}

// ---- elementwise -----------------------------------------------------------------------------

py::object gelu_forward(const py::handle& x_obj, bool approximate_tanh) {
    DeviceArray x = in_f32(x_obj, "x");
    DeviceArray y = empty(x.shape);
    cudaStream_t stream = current_stream();
    if (x.size() > 0) {
        py::gil_scoped_release nogil;
        lc::gelu_forward(y.data<float>(), x.data<float>(), x.size(), approximate_tanh, stream);
    }
    return y.owner;
}

py::object gelu_backward(const py::handle& dy_obj, const py::handle& x_obj, bool approximate_tanh) {
    DeviceArray dy = in_f32(dy_obj, "dy"), x = in_f32(x_obj, "x");
    require_shape(dy, "dy", x.shape);
    DeviceArray dx = empty(x.shape);
    cudaStream_t stream = current_stream();
    if (x.size() > 0) {
        py::gil_scoped_release nogil;
        lc::gelu_backward(dx.data<float>(), dy.data<float>(), x.data<float>(), x.size(), approximate_tanh, stream);
    }
    return dx.owner;
}

// ---- cross-entropy, embedding, AdamW ---------------------------------------------------------

std::pair<int64_t, int64_t> cross_entropy_dims(const DeviceArray& logits, const DeviceArray& targets,
                                               int64_t ignore_index, cudaStream_t stream) {
    require_ndim(logits, "logits", 2, 2);
    const int64_t N = logits.dim(0), V = logits.dim(1);
    if (V == 0) fail("logits: the vocabulary (last) axis must not be empty");
    require_shape(targets, "targets", {N});
    require_ids_in_range(targets, V, "targets", stream, ignore_index);
    return {N, V};
}

py::tuple cross_entropy_forward(const py::handle& logits_obj, const py::handle& targets_obj, int64_t ignore_index) {
    DeviceArray logits = in_f32(logits_obj, "logits"), targets = in_i64(targets_obj, "targets");
    cudaStream_t stream = current_stream();
    auto [N, V] = cross_entropy_dims(logits, targets, ignore_index, stream);
    DeviceArray loss = empty({N}), lse = empty({N});
    if (N > 0) {
        py::gil_scoped_release nogil;
        lc::cross_entropy_forward(loss.data<float>(), lse.data<float>(), logits.data<float>(), targets.data<int64_t>(),
                                  N, V, ignore_index, stream);
    }
    return py::make_tuple(loss.owner, lse.owner);
}

py::object cross_entropy_backward(const py::handle& dloss_obj, const py::handle& logits_obj,
                                  const py::handle& targets_obj, const py::handle& lse_obj, int64_t ignore_index) {
    DeviceArray dloss = in_f32(dloss_obj, "dloss"), logits = in_f32(logits_obj, "logits"),
                targets = in_i64(targets_obj, "targets"), lse = in_f32(lse_obj, "lse");
    cudaStream_t stream = current_stream();
    auto [N, V] = cross_entropy_dims(logits, targets, ignore_index, stream);
    require_shape(dloss, "dloss", {N});
    require_shape(lse, "lse", {N});
    DeviceArray dlogits = empty(logits.shape);
    if (N > 0) {
        py::gil_scoped_release nogil;
        lc::cross_entropy_backward(dlogits.data<float>(), dloss.data<float>(), logits.data<float>(),
                                   targets.data<int64_t>(), lse.data<float>(), N, V, ignore_index, stream);
    }
    return dlogits.owner;
}

py::object embedding_forward(const py::handle& w_obj, const py::handle& ids_obj) {
    DeviceArray w = in_f32(w_obj, "weight"), ids = in_i64(ids_obj, "ids");
    require_ndim(w, "weight", 2, 2);
    const int64_t V = w.dim(0), C = w.dim(1);
    cudaStream_t stream = current_stream();
    require_ids_in_range(ids, V, "ids", stream);
    Shape out_shape = ids.shape;
    out_shape.push_back(C);
    DeviceArray out = empty(out_shape);
    if (out.size() > 0) {
        py::gil_scoped_release nogil;
        lc::embedding_forward(out.data<float>(), w.data<float>(), ids.data<int64_t>(), ids.size(), C, stream);
    }
    return out.owner;
}

py::object embedding_backward(const py::handle& dout_obj, const py::handle& ids_obj, int64_t vocab_size) {
    DeviceArray dout = in_f32(dout_obj, "dout"), ids = in_i64(ids_obj, "ids");
    if (vocab_size < 0) fail("vocab_size: expected a number >= 0, got " + std::to_string(vocab_size));
    if (dout.ndim() != ids.ndim() + 1) fail("dout: expected the shape of ids plus a channel axis, got " + shape_str(dout.shape));
    Shape want = ids.shape;
    want.push_back(dout.dim(-1));
    require_shape(dout, "dout", want);
    cudaStream_t stream = current_stream();
    require_ids_in_range(ids, vocab_size, "ids", stream);
    const int64_t C = want.back(), n = ids.size();
    DeviceArray dw = empty({vocab_size, C});
    DeviceArray ws = workspace(lc::embedding_backward_workspace_bytes(n, vocab_size, C));
    if (dw.size() > 0) {
        py::gil_scoped_release nogil;
        lc::embedding_backward(dw.data<float>(), dout.data<float>(), ids.data<int64_t>(), n, vocab_size, C,
                               ws.data<void>(), stream);
    }
    return dw.owner;
}

void adamw_step(const py::handle& p_obj, const py::handle& g_obj, const py::handle& m_obj, const py::handle& v_obj,
                float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    DeviceArray p = inout_f32(p_obj, "param"), g = in_f32(g_obj, "grad"), m = inout_f32(m_obj, "m"),
                v = inout_f32(v_obj, "v");
    require_shape(g, "grad", p.shape);
    require_shape(m, "m", p.shape);
    require_shape(v, "v", p.shape);
    if (step < 1) fail("step: expected a count starting at 1, got " + std::to_string(step));
    cudaStream_t stream = current_stream();
    if (p.size() == 0) return;
    py::gil_scoped_release nogil;
    lc::adamw_step(p.data<float>(), m.data<float>(), v.data<float>(), g.data<float>(), p.size(), lr, beta1, beta2,
                   eps, weight_decay, step, stream);
}

// ---- attention -------------------------------------------------------------------------------

// A float32 (B, L, heads, D) array whose last axis is contiguous: its element strides.
DeviceArray strided_bshd(const py::handle& obj, const char* name, int64_t strides[3]) {
    DeviceArray a = device_array(obj, name);
    require_dtype(a, name, "<f4", "float32");
    require_ndim(a, name, 4, 4);
    if (a.size() == 0) {
        for (int i = 0; i < 3; ++i) strides[i] = 0;
        return a;
    }
    if (a.shape[3] > 1 && a.strides[3] != 4) fail(std::string(name) + ": the last (head dimension) axis must be contiguous");
    for (int i = 0; i < 3; ++i) {
        if (a.strides[i] % 4 != 0) fail(std::string(name) + ": strides must be whole float32 elements");
        if (a.strides[i] < 0) fail(std::string(name) + ": negative strides are not supported");
        strides[i] = a.strides[i] / 4;
    }
    if (a.ptr % 4 != 0) fail(std::string(name) + ": the data pointer must be float32-aligned");
    return a;
}

struct AttentionArgs {
    DeviceArray q, k, v;
    llmcore::AttentionShape s{};
    const float* alibi = nullptr;
    DeviceArray alibi_arr;
};

AttentionArgs attention_args(const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj, bool causal,
                             const py::object& alibi_obj) {
    AttentionArgs a;
    a.q = strided_bshd(q_obj, "q", a.s.q_strides);
    a.k = strided_bshd(k_obj, "k", a.s.k_strides);
    a.v = strided_bshd(v_obj, "v", a.s.v_strides);
    auto& s = a.s;
    s.B = a.q.dim(0); s.T = a.q.dim(1); s.H = a.q.dim(2); s.D = a.q.dim(3);
    s.S = a.k.dim(1); s.Hkv = a.k.dim(2);
    require_shape(a.k, "k", {s.B, s.S, s.Hkv, s.D});
    require_shape(a.v, "v", a.k.shape);
    if (s.Hkv == 0 || s.H % s.Hkv != 0)
        fail("k: the number of key/value heads (" + std::to_string(s.Hkv) +
             ") must divide the number of query heads (" + std::to_string(s.H) + ")");
    if (s.D > 256) fail("q: the CUDA core supports head dimensions up to 256, got " + std::to_string(s.D));
    if (causal && s.S < s.T)
        fail("k: causal attention needs at least as many keys as queries (S=" + std::to_string(s.S) +
             " < T=" + std::to_string(s.T) + ")");
    if (!alibi_obj.is_none()) {
        a.alibi_arr = in_f32(alibi_obj, "alibi_slopes");
        require_shape(a.alibi_arr, "alibi_slopes", {s.H});
        a.alibi = a.alibi_arr.data<float>();
    }
    return a;
}

py::tuple attention_forward(const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj, bool causal,
                            float scale, const py::object& alibi_obj) {
    AttentionArgs a = attention_args(q_obj, k_obj, v_obj, causal, alibi_obj);
    const auto& s = a.s;
    DeviceArray out = empty(a.q.shape), lse = empty({s.B, s.H, s.T});
    cudaStream_t stream = current_stream();
    if (out.size() > 0) {
        if (s.S == 0) fail("k: attention needs at least one key (S = 0)");
        DeviceArray ws = workspace(lc::attention_forward_workspace_bytes(s));
        py::gil_scoped_release nogil;
        lc::attention_forward(out.data<float>(), lse.data<float>(), a.q.data<float>(), a.k.data<float>(),
                              a.v.data<float>(), s, causal, scale, a.alibi, ws.data<void>(), stream);
    }
    return py::make_tuple(out.owner, lse.owner);
}

py::tuple attention_backward(const py::handle& dout_obj, const py::handle& q_obj, const py::handle& k_obj,
                             const py::handle& v_obj, const py::handle& out_obj, const py::handle& lse_obj,
                             bool causal, float scale, const py::object& alibi_obj) {
    AttentionArgs a = attention_args(q_obj, k_obj, v_obj, causal, alibi_obj);
    const auto& s = a.s;
    DeviceArray dout = in_f32(dout_obj, "dout"), out = in_f32(out_obj, "out"), lse = in_f32(lse_obj, "lse");
    require_shape(dout, "dout", a.q.shape);
    require_shape(out, "out", a.q.shape);
    require_shape(lse, "lse", {s.B, s.H, s.T});
    DeviceArray dq = empty(a.q.shape), dk = empty(a.k.shape), dv = empty(a.v.shape);
    cudaStream_t stream = current_stream();
    if (dq.size() + dk.size() > 0) {
        if (s.T == 0 || s.H == 0) {  // no queries: every key gradient is an empty sum
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dk.data<void>(), 0, dk.size() * 4, stream));
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dv.data<void>(), 0, dv.size() * 4, stream));
        } else {
            DeviceArray ws = workspace(lc::attention_backward_workspace_bytes(s));
            py::gil_scoped_release nogil;
            lc::attention_backward(dq.data<float>(), dk.data<float>(), dv.data<float>(), dout.data<float>(),
                                   a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), out.data<float>(),
                                   lse.data<float>(), s, causal, scale, a.alibi, ws.data<void>(), stream);
        }
    }
    return py::make_tuple(dq.owner, dk.owner, dv.owner);
}

// ---- devices ---------------------------------------------------------------------------------

// The number of visible GPUs; 0 (not an error) where there is no driver or no device.
int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return 0;
    }
    return n;
}

py::dict device_properties(int index) {
    cudaDeviceProp p{};
    LLMCORE_CUDA_CHECK(cudaGetDeviceProperties(&p, index));
    py::dict d;
    d["name"] = std::string(p.name);
    d["compute_capability"] = py::make_tuple(p.major, p.minor);
    d["multiprocessors"] = p.multiProcessorCount;
    d["memory_bytes"] = (int64_t)p.totalGlobalMem;
    d["l2_bytes"] = p.l2CacheSize;
    d["shared_memory_per_block_optin"] = (int64_t)p.sharedMemPerBlockOptin;
    return d;
}

py::dict build_info() {
    py::dict d;
    d["architectures"] = std::string(LLMCORE_CUDA_ARCHS);
    d["cuda_runtime_built"] = CUDART_VERSION;
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
    d["driver"] = driver;
    return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "llmcore CUDA kernels (float32 storage). Use llmcore.ops for the checked public API.";

    m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false);
    m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
    m.def("linear_backward", &linear_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("has_bias"));
    m.def("softmax_forward", &softmax_forward, py::arg("x"));
    m.def("softmax_backward", &softmax_backward, py::arg("dy"), py::arg("y"));
    m.def("rmsnorm_forward", &rmsnorm_forward, py::arg("x"), py::arg("weight"), py::arg("eps"));
    m.def("rmsnorm_backward", &rmsnorm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"));
    m.def("layernorm_forward", &layernorm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
    m.def("layernorm_backward", &layernorm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
          py::arg("mean"), py::arg("rstd"));
    m.def("gelu_forward", &gelu_forward, py::arg("x"), py::arg("approximate_tanh"));
    m.def("gelu_backward", &gelu_backward, py::arg("dy"), py::arg("x"), py::arg("approximate_tanh"));
    m.def("cross_entropy_forward", &cross_entropy_forward, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"));
    m.def("cross_entropy_backward", &cross_entropy_backward, py::arg("dloss"), py::arg("logits"),
          py::arg("targets"), py::arg("lse"), py::arg("ignore_index"));
    m.def("embedding_forward", &embedding_forward, py::arg("weight"), py::arg("ids"));
    m.def("embedding_backward", &embedding_backward, py::arg("dout"), py::arg("ids"), py::arg("vocab_size"));
    m.def("adamw_step", &adamw_step, py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"),
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal"),
          py::arg("scale"), py::arg("alibi_slopes") = py::none());
    m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("out"), py::arg("lse"), py::arg("causal"), py::arg("scale"), py::arg("alibi_slopes") = py::none());

    m.def("set_matmul_precision", &set_matmul_precision, py::arg("precision"),
          "'highest' (fp32 FMA), 'high' (TF32 tensor cores) or 'medium' (bf16 tensor cores).");
    m.def("get_matmul_precision", &get_matmul_precision);
    m.def("device_count", &device_count, "Visible GPUs (0 without a driver or device).");
    m.def("device_properties", &device_properties, py::arg("index") = 0);
    m.def("build_info", &build_info, "Architectures compiled in, CUDA runtime version, driver version.");
}
