// Command-line front of the emulated kernels (emulate.h), for
// worker/tests/cuda_kernels_emulated.rs, which compiles it with the host C++ compiler:
//
//   emulate KERNEL DIR GRID_X GRID_Y BLOCK [SCALAR...]
//
// reads the kernel's inputs from DIR/NAME.bin (little-endian float32, or u32 for targets),
// runs the entry point of fused_ops.cu on that grid, and writes each output to DIR/NAME.out.
// Exit 2 on a usage error.
#define COCA_EMULATE
#include "fused_ops.cu"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

std::string dir;

template <typename T>
std::vector<T> read(const char* name, bool required = true) {
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

void write(const char* name, const std::vector<float>& v) {
  FILE* f = std::fopen((dir + "/" + name + ".out").c_str(), "wb");
  if (f == nullptr || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) {
    std::fprintf(stderr, "emulate: cannot write %s/%s.out\n", dir.c_str(), name);
    std::exit(2);
  }
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: emulate KERNEL DIR GRID_X GRID_Y BLOCK [SCALAR...]\n");
    return 2;
  }
  const std::string kernel = argv[1];
  dir = argv[2];
  const dim3 grid{(unsigned)std::atol(argv[3]), (unsigned)std::atol(argv[4]), 1};
  const dim3 block{(unsigned)std::atol(argv[5]), 1, 1};
  const int given = argc - 6;
  auto scalar = [&](int i) {
    if (i >= given) {
      std::fprintf(stderr, "emulate: %s needs more scalars\n", kernel.c_str());
      std::exit(2);
    }
    return std::atof(argv[6 + i]);
  };
  auto integer = [&](int i) { return (long long)scalar(i); };

  if (kernel == "layer_norm_fwd_f32") {  // rows d eps
    auto x = read<float>("x"), w = read<float>("w"), b = read<float>("b");
    std::vector<float> y(x.size());
    launch(grid, block, [&] {
      layer_norm_fwd_f32(x.data(), w.data(), b.data(), y.data(), integer(0), (int)integer(1),
                         (float)scalar(2));
    });
    write("y", y);
  } else if (kernel == "layer_norm_bwd_dx_f32") {  // rows d eps
    auto x = read<float>("x"), w = read<float>("w"), g = read<float>("g");
    std::vector<float> dx(x.size()), stats(2 * integer(0));
    launch(grid, block, [&] {
      layer_norm_bwd_dx_f32(x.data(), w.data(), g.data(), dx.data(), stats.data(), integer(0),
                            (int)integer(1), (float)scalar(2));
    });
    write("dx", dx);
    write("stats", stats);
  } else if (kernel == "layer_norm_bwd_partials_f32") {  // rows d chunk
    auto x = read<float>("x"), g = read<float>("g"), stats = read<float>("stats");
    std::vector<float> partial((size_t)grid.y * 2 * integer(1));
    launch(grid, block, [&] {
      layer_norm_bwd_partials_f32(x.data(), g.data(), stats.data(), partial.data(), integer(0),
                                  (int)integer(1), (int)integer(2));
    });
    write("partial", partial);
  } else if (kernel == "column_sum_f32") {  // chunks width
    auto partial = read<float>("partial");
    std::vector<float> out(integer(1));
    launch(grid, block, [&] {
      column_sum_f32(partial.data(), out.data(), (int)integer(0), (int)integer(1));
    });
    write("sums", out);
  } else if (kernel == "add_bias_f32") {  // n d
    auto y = read<float>("y"), b = read<float>("b");
    std::vector<float> out(y.size());
    launch(grid, block, [&] {
      add_bias_f32(y.data(), b.data(), out.data(), integer(0), (int)integer(1));
    });
    write("out", out);
  } else if (kernel == "column_partials_f32") {  // rows d chunk
    auto g = read<float>("g");
    std::vector<float> partial((size_t)grid.y * integer(1));
    launch(grid, block, [&] {
      column_partials_f32(g.data(), partial.data(), integer(0), (int)integer(1),
                          (int)integer(2));
    });
    write("partial", partial);
  } else if (kernel == "softmax_fwd_f32") {  // rows n scale t heads_t mask_batch
    auto x = read<float>("x"), mask = read<float>("mask", false);
    std::vector<float> y(x.size());
    const float* m = mask.empty() ? nullptr : mask.data();
    launch(grid, block, [&] {
      softmax_fwd_f32(x.data(), m, y.data(), integer(0), (int)integer(1), (float)scalar(2),
                      (int)integer(3), integer(4), (int)integer(5));
    });
    write("y", y);
  } else if (kernel == "softmax_bwd_f32") {  // rows n scale
    auto y = read<float>("y"), g = read<float>("g");
    std::vector<float> dx(y.size());
    launch(grid, block, [&] {
      softmax_bwd_f32(y.data(), g.data(), dx.data(), integer(0), (int)integer(1),
                      (float)scalar(2));
    });
    write("dx", dx);
  } else if (kernel == "gelu_fwd_f32") {  // n
    auto x = read<float>("x");
    std::vector<float> y(x.size());
    launch(grid, block, [&] { gelu_fwd_f32(x.data(), y.data(), integer(0)); });
    write("y", y);
  } else if (kernel == "gelu_bwd_f32") {  // n
    auto x = read<float>("x"), g = read<float>("g");
    std::vector<float> dx(x.size());
    launch(grid, block, [&] { gelu_bwd_f32(x.data(), g.data(), dx.data(), integer(0)); });
    write("dx", dx);
  } else if (kernel == "cross_entropy_fwd_f32") {  // rows v ignore
    auto x = read<float>("x");
    auto targets = read<unsigned int>("targets");
    std::vector<float> loss(integer(0));
    launch(grid, block, [&] {
      cross_entropy_fwd_f32(x.data(), targets.data(), loss.data(), integer(0), (int)integer(1),
                            integer(2));
    });
    write("loss", loss);
  } else if (kernel == "cross_entropy_bwd_f32") {  // rows v ignore
    auto x = read<float>("x"), g = read<float>("g");
    auto targets = read<unsigned int>("targets");
    std::vector<float> dx(x.size());
    launch(grid, block, [&] {
      cross_entropy_bwd_f32(x.data(), targets.data(), g.data(), dx.data(), integer(0),
                            (int)integer(1), integer(2));
    });
    write("dx", dx);
  } else if (kernel == "adam_moment_f32") {  // n beta squared
    auto m = read<float>("m"), g = read<float>("g");
    launch(grid, block, [&] {
      adam_moment_f32(m.data(), g.data(), integer(0), (float)scalar(1), (int)integer(2));
    });
    write("m", m);
  } else if (kernel == "adamw_param_f32") {  // n decay step_size inv_bias2_sqrt eps
    auto p = read<float>("p"), m = read<float>("m"), v = read<float>("v");
    launch(grid, block, [&] {
      adamw_param_f32(p.data(), m.data(), v.data(), integer(0), (float)scalar(1),
                      (float)scalar(2), (float)scalar(3), (float)scalar(4));
    });
    write("p", p);
  } else {
    std::fprintf(stderr, "emulate: unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  return 0;
}
