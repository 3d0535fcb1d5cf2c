// A C++ consumer of the detector ONNX model contract (version 1), with the ONNX Runtime C++ API.
//
//   detector_example model.onnx frame.ppm [more.ppm ...] [--score S]
//
// It reads the model's metadata (format tag, contract version, input format, batch size N,
// detections per image K, class names, per-class thresholds), fills batches of N frames (the
// last batch padded with copies of its last frame, whose results are not printed), runs the model
// and prints each frame's detections, using only the rows before num_detections[i] (the rows
// after are padding). Frames are binary PPM (P6) files, so the example needs no image library;
// all frames of one run must have the same size (a camera gives one size).
//
// Output, one line per detection:  frame <i> <class name> <score> <x1> <y1> <x2> <y2>
// and one summary line per frame:  frame <i>: <n> detections
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height * width * 3
};

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::string magic;
  int maxval = 0;
  Image image;
  in >> magic >> image.width >> image.height >> maxval;
  if (magic != "P6" || maxval != 255 || image.width <= 0 || image.height <= 0)
    throw std::runtime_error(path + ": not a binary 8-bit PPM (P6)");
  in.get();  // the single whitespace after maxval
  image.rgb.resize(static_cast<size_t>(image.width) * image.height * 3);
  in.read(reinterpret_cast<char*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size()));
  if (!in) throw std::runtime_error(path + ": truncated PPM");
  return image;
}

// JSON lists of the metadata: ["a", "b"] and [0.5, 0.7]. Enough for what the exporter writes
// (json.dumps with ensure_ascii: escapes are \" \\ and \uXXXX, kept as written here).
std::vector<std::string> json_strings(const std::string& text) {
  std::vector<std::string> out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '"') continue;
    std::string value;
    for (++i; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] == '\\' && i + 1 < text.size()) ++i;
      value += text[i];
    }
    out.push_back(value);
  }
  return out;
}

std::vector<float> json_floats(const std::string& text) {
  std::vector<float> out;
  std::string cleaned = text;
  for (char& c : cleaned)
    if (c == '[' || c == ']' || c == ',') c = ' ';
  std::istringstream in(cleaned);
  float value;
  while (in >> value) out.push_back(value);
  return out;
}

struct Contract {
  std::string input_format;  // "uint8_nhwc_bgr" or "float32_nchw_rgb"
  int64_t batch = 1, detections = 0;
  std::vector<std::string> class_names;
  std::vector<float> class_thresholds;  // empty: none stored
};

Contract read_contract(Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions allocator;
  Ort::ModelMetadata meta = session.GetModelMetadata();
  auto get = [&](const char* key) -> std::string {
    Ort::AllocatedStringPtr value = meta.LookupCustomMetadataMapAllocated(key, allocator);
    return value ? std::string(value.get()) : std::string();
  };
  if (get("detector_format") != "detector-onnx")
    throw std::runtime_error(path + ": not a detector ONNX model (metadata detector_format)");
  if (std::atoi(get("output_contract").c_str()) != 1)
    throw std::runtime_error(path + ": output contract " + get("output_contract") +
                             ", this example reads contract 1");
  Contract c;
  c.input_format = get("input_format");
  c.batch = std::atoll(get("batch_size").c_str());
  c.detections = std::atoll(get("detections_per_image").c_str());
  c.class_names = json_strings(get("class_names"));
  c.class_thresholds = json_floats(get("class_score_thresholds"));
  if (c.input_format != "uint8_nhwc_bgr" && c.input_format != "float32_nchw_rgb")
    throw std::runtime_error(path + ": unknown input_format " + c.input_format);
  if (c.batch < 1 || c.detections < 1 || c.class_names.empty())
    throw std::runtime_error(path + ": incomplete detector metadata");
  if (!c.class_thresholds.empty() && c.class_thresholds.size() != c.class_names.size())
    throw std::runtime_error(path + ": class_score_thresholds does not match class_names");
  return c;
}

// The input tensor of one batch: N frames, the last one repeated to fill it.
Ort::Value make_input(const Contract& c, const std::vector<const Image*>& frames,
                      std::vector<uint8_t>& raw, std::vector<float>& planar) {
  const int64_t n = c.batch, h = frames[0]->height, w = frames[0]->width;
  const size_t pixels = static_cast<size_t>(h * w);
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  if (c.input_format == "uint8_nhwc_bgr") {
    raw.resize(n * pixels * 3);
    for (int64_t b = 0; b < n; ++b) {
      const Image& f = *frames[std::min<size_t>(b, frames.size() - 1)];
      for (size_t p = 0; p < pixels; ++p)
        for (int ch = 0; ch < 3; ++ch) raw[(b * pixels + p) * 3 + ch] = f.rgb[p * 3 + 2 - ch];
    }
    const int64_t shape[4] = {n, h, w, 3};
    return Ort::Value::CreateTensor<uint8_t>(cpu, raw.data(), raw.size(), shape, 4);
  }
  planar.resize(n * 3 * pixels);
  for (int64_t b = 0; b < n; ++b) {
    const Image& f = *frames[std::min<size_t>(b, frames.size() - 1)];
    for (int ch = 0; ch < 3; ++ch)
      for (size_t p = 0; p < pixels; ++p)
        planar[(b * 3 + ch) * pixels + p] = f.rgb[p * 3 + ch] / 255.0f;
  }
  const int64_t shape[4] = {n, 3, h, w};
  return Ort::Value::CreateTensor<float>(cpu, planar.data(), planar.size(), shape, 4);
}

// Prints the valid rows of each real frame of one batch; returns how many it printed.
void print_batch(const Contract& c, std::vector<Ort::Value>& outputs, size_t first, size_t count,
                 float score_override) {
  const float* boxes = outputs[0].GetTensorData<float>();
  const float* scores = outputs[1].GetTensorData<float>();
  const int64_t* labels = outputs[2].GetTensorData<int64_t>();
  const int64_t* counts = outputs[3].GetTensorData<int64_t>();
  const int64_t k = c.detections;
  for (size_t i = 0; i < count; ++i) {
    int printed = 0;
    for (int64_t j = 0; j < counts[i]; ++j) {  // rows at and after num_detections are padding
      const int64_t label = labels[i * k + j];
      const float score = scores[i * k + j];
      const bool known = label >= 1 && label <= static_cast<int64_t>(c.class_names.size());
      float threshold = score_override;
      if (threshold < 0) threshold = known && !c.class_thresholds.empty()
                                         ? c.class_thresholds[label - 1] : 0.5f;
      if (score < threshold) continue;
      const float* b = boxes + (i * k + j) * 4;
      std::cout << "frame " << first + i << " "
                << (known ? c.class_names[label - 1] : std::to_string(label)) << " " << score
                << " " << b[0] << " " << b[1] << " " << b[2] << " " << b[3] << "\n";
      ++printed;
    }
    std::cout << "frame " << first + i << ": " << printed << " detections\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> paths;
  float score = -1.0f;  // < 0: the model's per-class thresholds, else 0.5
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--score" && i + 1 < argc) score = std::strtof(argv[++i], nullptr);
    else paths.push_back(arg);
  }
  if (argc < 3 || paths.empty()) {
    std::cerr << "usage: " << argv[0] << " model.onnx frame.ppm [more.ppm ...] [--score S]\n";
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "detector_example");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    Ort::Session session(env, argv[1], options);
    const Contract c = read_contract(session, argv[1]);
    std::cout << "model: " << c.input_format << ", batch " << c.batch << ", " << c.detections
              << " rows per image, " << c.class_names.size() << " classes\n";

    std::vector<Image> images;
    for (const auto& p : paths) images.push_back(read_ppm(p));
    for (const auto& im : images)
      if (im.width != images[0].width || im.height != images[0].height)
        throw std::runtime_error("all frames of one run must have the same size");

    const char* input_names[] = {"images"};
    const char* output_names[] = {"boxes", "scores", "labels", "num_detections"};
    std::vector<uint8_t> raw;
    std::vector<float> planar;
    for (size_t start = 0; start < images.size(); start += c.batch) {
      std::vector<const Image*> batch;
      for (size_t i = start; i < images.size() && i < start + c.batch; ++i)
        batch.push_back(&images[i]);
      Ort::Value input = make_input(c, batch, raw, planar);
      std::vector<Ort::Value> outputs =
          session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 4);
      print_batch(c, outputs, start, batch.size(), score);
    }
  } catch (const std::exception& e) {  // Ort::Exception is a std::exception
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
