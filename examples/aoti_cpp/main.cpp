// Runs a package written by `mmfs-fast export --format aoti` from C++, through libtorch's
// AOTIModelPackageLoader.
//
//   mmfs_aoti PACKAGE.pt2                        prints the package's metadata (JSON)
//   mmfs_aoti PACKAGE.pt2 INPUTS.pt OUTPUTS.pt   runs it on a list of tensors saved with
//                                                torch.save and saves the outputs the same way
//
// The inputs are those the metadata lists, in its order: for the stylize graph faces
// (B, 3, S, S) in [-1, 1] and w_plus (B, 10, 512), float32. An application builds them from its
// own buffers instead, e.g. torch::from_blob(pixels, {1, 3, 512, 512}, torch::kFloat32).
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 && argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 [INPUTS.pt OUTPUTS.pt]\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::cout << loader.get_metadata().at("mmfs_fast") << std::endl;
    if (argc == 2) return 0;

    const c10::IValue saved = torch::jit::pickle_load(read_file(argv[2]));
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& value : saved.toListRef()) inputs.push_back(value.toTensor());
    std::vector<c10::IValue> outputs;
    for (const at::Tensor& output : loader.run(inputs)) outputs.emplace_back(output);
    // a tuple of tensors: what torch.load(weights_only=True) accepts
    write_file(argv[3], torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(outputs))));
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
