// Command-line front of the emulated kernels (emulate.h), for
// worker/tests/cuda_kernels_emulated.rs, which compiles it with the host C++ compiler:
//
//   emulate KERNEL DIR GRID_X GRID_Y BLOCK [SCALAR...]
//
// KERNEL is an entry point of fused_ops.cu (e.g. layer_norm_fwd_bf16). Its inputs are read
// from DIR/NAME.bin (little-endian float32, or u32 for targets; inputs of the kernel's dtype are
// given as float32 and rounded to it), it runs on that grid, and each output is written to
// DIR/NAME.out as float32. Exit 2 on a usage error.
#define COCA_EMULATE
#include "fused_ops.cu"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

std::string dir;

template <typename T>
std::vector<T> read_raw(const char* name, bool required) {
  std::vector<T> v;
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "rb");
  if (f == nullptr) {
    if (!required) return v;
    std::fprintf(stderr, "emulate: cannot read %s/%s.bin\n", dir.c_str(), name);
    std::exit(2);
  }
  T value;
  while (std::fread(&value, sizeof(T), 1, f) == 1) v.push_back(value);
  std::fclose(f);
  return v;
}

// An input of type T, given as float32.
template <typename T>
std::vector<T> read(const char* name, bool required = true) {
  std::vector<T> v;
  for (float x : read_raw<float>(name, required)) v.push_back(Io<T>::store(x));
  return v;
}

std::vector<unsigned int> read_u32(const char* name) { return read_raw<unsigned int>(name, true); }

// An output of type T, written as float32.
template <typename T>
void write(const char* name, const std::vector<T>& v) {
  std::vector<float> out;
  for (const T& x : v) out.push_back(Io<T>::load(x));
  FILE* f = std::fopen((dir + "/" + name + ".out").c_str(), "wb");
  if (f == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) {
    std::fprintf(stderr, "emulate: cannot write %s/%s.out\n", dir.c_str(), name);
    std::exit(2);
  }
  std::fclose(f);
}

struct Args {
  dim3 grid, block;
  std::vector<double> scalars;
  double scalar(size_t i) const {
    if (i >= scalars.size()) {
      std::fprintf(stderr, "emulate: the kernel needs more scalars\n");
      std::exit(2);
    }
    return scalars[i];
  }
  long long integer(size_t i) const { return (long long)scalar(i); }
};

// The kernels with inputs or outputs of type T; false if `base` is none of them.
template <typename T>
bool run_typed(const std::string& base, const Args& a) {
  if (base == "layer_norm_fwd") {  // rows d eps
    auto x = read<T>("x");
    auto w = read<float>("w"), b = read<float>("b");
    std::vector<float> y(x.size());
    launch(a.grid, a.block, [&] {
      layer_norm_fwd<T>(x.data(), w.data(), b.data(), y.data(), a.integer(0), (int)a.integer(1),
                        (float)a.scalar(2));
    });
    write("y", y);
  } else if (base == "layer_norm_bwd_dx") {  // rows d eps
    auto x = read<T>("x");
    auto w = read<float>("w"), g = read<float>("g");
    std::vector<float> dx(x.size()), stats(2 * a.integer(0));
    launch(a.grid, a.block, [&] {
      layer_norm_bwd_dx<T>(x.data(), w.data(), g.data(), dx.data(), stats.data(), a.integer(0),
                           (int)a.integer(1), (float)a.scalar(2));
    });
    write("dx", dx);
    write("stats", stats);
  } else if (base == "layer_norm_bwd_partials") {  // rows d chunk
    auto x = read<T>("x");
    auto g = read<float>("g"), stats = read<float>("stats");
    std::vector<float> partial((size_t)a.grid.y * 2 * a.integer(1));
    launch(a.grid, a.block, [&] {
      layer_norm_bwd_partials<T>(x.data(), g.data(), stats.data(), partial.data(), a.integer(0),
                                 (int)a.integer(1), (int)a.integer(2));
    });
    write("partial", partial);
  } else if (base == "column_sum") {  // chunks width
    auto partial = read<float>("partial");
    std::vector<T> out(a.integer(1));
    launch(a.grid, a.block, [&] {
      column_sum<T>(partial.data(), out.data(), (int)a.integer(0), (int)a.integer(1));
    });
    write("sums", out);
  } else if (base == "add_bias") {  // n d
    auto y = read<T>("y"), b = read<T>("b");
    std::vector<T> out(y.size());
    launch(a.grid, a.block,
           [&] { add_bias<T>(y.data(), b.data(), out.data(), a.integer(0), (int)a.integer(1)); });
    write("out", out);
  } else if (base == "column_partials") {  // rows d chunk
    auto g = read<T>("g");
    std::vector<float> partial((size_t)a.grid.y * a.integer(1));
    launch(a.grid, a.block, [&] {
      column_partials<T>(g.data(), partial.data(), a.integer(0), (int)a.integer(1),
                         (int)a.integer(2));
    });
    write("partial", partial);
  } else if (base == "softmax_fwd") {  // rows n scale t heads_t mask_batch
    auto x = read<T>("x");
    auto mask = read<float>("mask", false);
    std::vector<float> y(x.size());
    const float* m = mask.empty() ? nullptr : mask.data();
    launch(a.grid, a.block, [&] {
      softmax_fwd<T>(x.data(), m, y.data(), a.integer(0), (int)a.integer(1), (float)a.scalar(2),
                     (int)a.integer(3), a.integer(4), (int)a.integer(5));
    });
    write("y", y);
  } else if (base == "gelu_fwd") {  // n
    auto x = read<T>("x");
    std::vector<T> y(x.size());
    launch(a.grid, a.block, [&] { gelu_fwd<T>(x.data(), y.data(), a.integer(0)); });
    write("y", y);
  } else if (base == "gelu_bwd") {  // n
    auto x = read<T>("x"), g = read<T>("g");
    std::vector<T> dx(x.size());
    launch(a.grid, a.block, [&] { gelu_bwd<T>(x.data(), g.data(), dx.data(), a.integer(0)); });
    write("dx", dx);
  } else if (base == "cross_entropy_stats_fwd") {  // rows v ignore start vocab
    auto x = read<T>("x");
    auto targets = read_u32("targets");
    std::vector<float> stats(2 * a.integer(0));
    launch(a.grid, a.block, [&] {
      cross_entropy_stats_fwd<T>(x.data(), targets.data(), stats.data(), a.integer(0),
                                 (int)a.integer(1), a.integer(2), a.integer(3), a.integer(4));
    });
    write("stats", stats);
  } else if (base == "cross_entropy_stats_bwd") {  // rows v ignore start
    auto x = read<T>("x");
    auto aux = read<float>("aux");
    auto targets = read_u32("targets");
    std::vector<T> dx(x.size());
    launch(a.grid, a.block, [&] {
      cross_entropy_stats_bwd<T>(x.data(), targets.data(), aux.data(), dx.data(), a.integer(0),
                                 (int)a.integer(1), a.integer(2), a.integer(3));
    });
    write("dx", dx);
  } else {
    return false;
  }
  return true;
}

// The float32-only kernels; false if `kernel` is none of them.
bool run_f32(const std::string& kernel, const Args& a) {
  if (kernel == "softmax_bwd_f32") {  // rows n scale
    auto y = read<float>("y"), g = read<float>("g");
    std::vector<float> dx(y.size());
    launch(a.grid, a.block, [&] {
      softmax_bwd_f32(y.data(), g.data(), dx.data(), a.integer(0), (int)a.integer(1),
                      (float)a.scalar(2));
    });
    write("dx", dx);
  } else if (kernel == "embedding_fwd_f32") {  // n d v start vocab
    auto table = read<float>("table");
    table.resize(table.size() + a.integer(1), NAN);  // a guard row: a read past the table shows
    auto ids = read_u32("ids");
    std::vector<float> out((size_t)a.integer(0) * a.integer(1));
    launch(a.grid, a.block, [&] {
      embedding_fwd_f32(table.data(), ids.data(), out.data(), a.integer(0), (int)a.integer(1),
                        a.integer(2), a.integer(3), a.integer(4));
    });
    write("out", out);
  } else if (kernel == "embedding_bwd_f32") {  // n d v start
    auto g = read<float>("g");
    auto ids = read_u32("ids");
    std::vector<float> dtable((size_t)a.integer(2) * a.integer(1), 0.0f);
    launch(a.grid, a.block, [&] {
      embedding_bwd_f32(ids.data(), g.data(), dtable.data(), a.integer(0), (int)a.integer(1),
                        a.integer(2), a.integer(3));
    });
    write("dtable", dtable);
  } else if (kernel == "adam_moment_f32") {  // n beta squared
    auto m = read<float>("m"), g = read<float>("g");
    launch(a.grid, a.block, [&] {
      adam_moment_f32(m.data(), g.data(), a.integer(0), (float)a.scalar(1), (int)a.integer(2));
    });
    write("m", m);
  } else if (kernel == "adamw_param_f32") {  // n decay step_size inv_bias2_sqrt eps
    auto p = read<float>("p"), m = read<float>("m"), v = read<float>("v");
    launch(a.grid, a.block, [&] {
      adamw_param_f32(p.data(), m.data(), v.data(), a.integer(0), (float)a.scalar(1),
                      (float)a.scalar(2), (float)a.scalar(3), (float)a.scalar(4));
    });
    write("p", p);
  } else {
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: emulate KERNEL DIR GRID_X GRID_Y BLOCK [SCALAR...]\n");
    return 2;
  }
  const std::string kernel = argv[1];
  dir = argv[2];
  Args a;
  a.grid = dim3{(unsigned)std::atol(argv[3]), (unsigned)std::atol(argv[4]), 1};
  a.block = dim3{(unsigned)std::atol(argv[5]), 1, 1};
  for (int i = 6; i < argc; ++i) a.scalars.push_back(std::atof(argv[i]));
  const size_t cut = kernel.rfind('_');
  const std::string base = kernel.substr(0, cut == std::string::npos ? 0 : cut);
  const std::string suffix = cut == std::string::npos ? "" : kernel.substr(cut + 1);
  const bool ran = run_f32(kernel, a) || (suffix == "f32" && run_typed<float>(base, a)) ||
                   (suffix == "bf16" && run_typed<__nv_bfloat16>(base, a)) ||
                   (suffix == "f16" && run_typed<__half>(base, a));
  if (!ran) {
    std::fprintf(stderr, "emulate: unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  return 0;
}
