// run_artifact: run a graphopt CPU artifact (model.so) from C++, with the TVM runtime only (no Python).
//
//   run_artifact ARTIFACT_DIR IN0.npy [IN1.npy ...] [-o OUT_PREFIX] [--repeat N]
//
// Inputs are .npy files (C order, little-endian; one per model input, in the manifest's order). Outputs are
// written as OUT_PREFIX0.npy, OUT_PREFIX1.npy, ... (default prefix: out). --repeat N times N calls and prints the
// median in ms. Threads: TVM_NUM_THREADS if set, else this process's physical cores, as graphopt.load. Build it
// with the command `python -m graphopt.targets.tvm.deploy` prints (headers and libraries come with the apache-tvm
// and apache-tvm-ffi wheels). The calls below are what graphopt.load does in Python:
// load the library, create the Relax VM with the pooled allocator on the CPU, call "prepare" once where the
// artifact has it, call "main".
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using tvm::ffi::Tensor;

// Host memory on a 64-byte boundary: what TVM allocates, and what the kernels may assume of their arguments.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (tvm::ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n == 0 ? 64 : n);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct NpyType {
  const char* descr;
  DLDataType dtype;
};

// The dtypes graphopt artifacts take and return.
const NpyType kTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f2", {kDLFloat, 16, 1}}, {"<f8", {kDLFloat, 64, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"<i4", {kDLInt, 32, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"|b1", {kDLBool, 8, 1}},
};

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header has no '" + key + "'");
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  if (header[at] == '\'') return header.substr(at + 1, header.find('\'', at + 1) - at - 1);
  if (header[at] == '(') return header.substr(at + 1, header.find(')', at) - at - 1);
  size_t end = header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

Tensor ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (HeaderValue(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran order; save it with np.ascontiguousarray");
  std::string descr = HeaderValue(header, "descr");
  const NpyType* type = nullptr;
  for (const NpyType& t : kTypes)
    if (descr == t.descr) type = &t;
  if (type == nullptr) throw std::runtime_error(path + ": unsupported dtype " + descr);
  std::vector<int64_t> shape;
  std::stringstream dims(HeaderValue(header, "shape"));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(d));
  Tensor t = Tensor::FromNDAlloc(AlignedAlloc(), tvm::ffi::Shape(shape), type->dtype, DLDevice{kDLCPU, 0});
  size_t nbytes = (type->dtype.bits + 7) / 8;
  for (int64_t d : shape) nbytes *= d;
  f.read(static_cast<char*>(t.data_ptr()), nbytes);
  if (static_cast<size_t>(f.gcount()) != nbytes) throw std::runtime_error(path + " is truncated");
  return t;
}

void WriteNpy(const std::string& path, const Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  const char* descr = nullptr;
  for (const NpyType& k : kTypes)
    if (k.dtype.code == t->dtype.code && k.dtype.bits == t->dtype.bits) descr = k.descr;
  if (descr == nullptr) throw std::runtime_error("output dtype has no .npy name");
  std::string shape;
  size_t nbytes = (t->dtype.bits + 7) / 8;
  for (int i = 0; i < t->ndim; ++i) {
    shape += std::to_string(t->shape[i]) + (t->ndim == 1 ? "," : (i + 1 < t->ndim ? ", " : ""));
    nbytes *= t->shape[i];
  }
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // data starts on a 64-byte boundary
  header += '\n';
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t n = static_cast<uint16_t>(header.size());
    f.write(reinterpret_cast<const char*>(&n), 2);
    f << header;
    f.write(static_cast<const char*>(t->data), nbytes);
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

// Physical cores this process may use (its affinity mask, one per (package, core) pair): graphopt.load's default
// for TVM_NUM_THREADS. TVM's own default is half the logical CPUs, one thread on a 2-vCPU virtual machine.
int PhysicalCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  std::set<std::string> cores;
  int logical = 0;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &set)) continue;
    ++logical;
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
    std::string p, k;
    if (!(pkg >> p) || !(core >> k)) return std::max(1, logical);  // no topology: count the logical CPUs
    cores.insert(p + ":" + k);
  }
  return std::max<int>(1, std::min<int>(logical, cores.size()));
}

// What `import graphopt` sets up for TVM unless the user chose: kernels on the physical cores, workers unpinned
// (pinned, a caller that started on a worker's core ran every parallel kernel at one thread's speed).
void DefaultThreads() {
  if (!std::getenv("TVM_NUM_THREADS") && !std::getenv("OMP_NUM_THREADS"))
    setenv("TVM_NUM_THREADS", std::to_string(PhysicalCores()).c_str(), 1);
  setenv("TVM_BIND_THREADS", "0", 0);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> inputs;
  std::string folder, prefix = "out";
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-o" && i + 1 < argc) {
      prefix = argv[++i];
    } else if (a == "--repeat" && i + 1 < argc) {
      repeat = std::stoi(argv[++i]);
    } else if (a == "-h" || a == "--help") {
      std::cout << "usage: run_artifact ARTIFACT_DIR IN0.npy [IN1.npy ...] [-o OUT_PREFIX] [--repeat N]\n";
      return 0;
    } else if (folder.empty()) {
      folder = a;
    } else {
      inputs.push_back(a);
    }
  }
  if (folder.empty()) {
    std::cerr << "usage: run_artifact ARTIFACT_DIR IN0.npy [IN1.npy ...] [-o OUT_PREFIX] [--repeat N]\n";
    return 2;
  }
  DefaultThreads();
  try {
    namespace ffi = tvm::ffi;
    ffi::Module lib = ffi::Module::LoadFromFile(folder + "/model.so");
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    const int kPooled = 2;  // the allocator graphopt.load (TVM's VirtualMachine) uses
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooled);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<ffi::AnyView> args;
    std::vector<Tensor> tensors;
    for (const std::string& p : inputs) tensors.push_back(ReadNpy(p));
    // weights the artifact makes once, at load (int4 nibbles widened, weight-only int8 codes dequantized):
    // "prepare" returns them and every call of "main" takes them after the inputs (the manifest's
    // target_info.prepared_weights counts them)
    if (auto prepare = vm->GetFunction("prepare")) {
      Tensor seed = Tensor::FromNDAlloc(AlignedAlloc(), tvm::ffi::Shape({1}), DLDataType{kDLInt, 8, 1},
                                        DLDevice{kDLCPU, 0});  // (never read)
      for (const ffi::Any& w : (*prepare)(seed).cast<ffi::Array<ffi::Any>>()) tensors.push_back(w.cast<Tensor>());
    }
    for (const Tensor& t : tensors) args.emplace_back(t);
    ffi::Any result;
    main_fn.CallPacked(args.data(), static_cast<int>(args.size()), &result);

    std::vector<Tensor> outs;
    if (auto one = result.try_cast<Tensor>()) {
      outs.push_back(*one);
    } else {
      for (const ffi::Any& o : result.cast<ffi::Array<ffi::Any>>()) outs.push_back(o.cast<Tensor>());
    }
    for (size_t i = 0; i < outs.size(); ++i) WriteNpy(prefix + std::to_string(i) + ".npy", outs[i]);

    if (repeat > 0) {
      std::vector<double> ms;
      for (int r = 0; r < repeat; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        main_fn.CallPacked(args.data(), static_cast<int>(args.size()), &result);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("median %.3f ms over %d calls\n", ms[ms.size() / 2], repeat);
    }
    std::printf("wrote %zu output(s): %s0.npy ...\n", outs.size(), prefix.c_str());
  } catch (const std::exception& e) {
    std::cerr << "run_artifact: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
