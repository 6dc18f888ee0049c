// pybind11 bindings for the CUDA kernels. Deliberately torch-free: pointers and the stream come
// in as integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), so the extension
// builds against a CPU-only torch and any torch version.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

// Defined in element_linear.cu.
void element_linear_forward(uintptr_t x, uintptr_t w, uintptr_t species, uintptr_t y, int64_t N,
                            int64_t mul_in, int64_t mul_out, int64_t d, double alpha,
                            bool is_double, uintptr_t stream);

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsekern CUDA kernels (raw device pointers, no torch dependency)";
  m.def("element_linear_forward", &element_linear_forward, py::arg("x_ptr"), py::arg("w_ptr"),
        py::arg("species_ptr"), py::arg("y_ptr"), py::arg("N"), py::arg("mul_in"),
        py::arg("mul_out"), py::arg("d"), py::arg("alpha"), py::arg("is_double"),
        py::arg("stream"),
        // The launch is asynchronous and touches no Python objects.
        py::call_guard<py::gil_scoped_release>(),
        "y[n,v,m] = alpha * sum_u x[n,u,m] * w[species[n],u,v] on contiguous float32/float64 "
        "device buffers; enqueued on `stream` (a cudaStream_t as int) of the current device.");
}
