// Standalone replay driver for the ThreadSanitizer build of the harness (a TSan library
// cannot be loaded into an uninstrumented Python). tests/cudahost.py records the launches of
// an op (kernel symbol, grid, block, arguments, the initial bytes of every buffer) into a
// directory; this program replays them through cuda_host::launch and writes every buffer
// back, so the test checks both the TSan report and the results.
//
//   replay DIR     reads DIR/launches.txt and DIR/buf<i>.bin, writes DIR/out<i>.bin
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using Entry = void (*)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void**);
extern const std::map<std::string, Entry>& cuda_host_entries();

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    const std::string dir = argv[1];
    std::ifstream in(dir + "/launches.txt");
    std::vector<std::vector<char>> buffers;
    std::string word;
    while (in >> word) {
        if (word == "buffer") {
            std::size_t id, nbytes;
            in >> id >> nbytes;
            buffers.resize(id + 1);
            buffers[id].resize(nbytes + 16);
            std::ifstream bin(dir + "/buf" + std::to_string(id) + ".bin", std::ios::binary);
            bin.read(buffers[id].data(), nbytes);
        } else if (word == "launch") {
            std::string sym;
            unsigned g[3], b[3];
            std::size_t nargs;
            in >> sym >> g[0] >> g[1] >> g[2] >> b[0] >> b[1] >> b[2] >> nargs;
            std::vector<std::vector<char>> store(nargs, std::vector<char>(8));
            std::vector<void*> argv_(nargs);
            for (std::size_t i = 0; i < nargs; ++i) {
                std::string kind, text;
                in >> kind >> text;
                char* slot = store[i].data();
                if (kind == "p") {
                    void* p = buffers.at(std::stoul(text)).data();
                    *reinterpret_cast<void**>(slot) = p;
                } else if (kind == "i") {
                    *reinterpret_cast<int*>(slot) = std::stoi(text);
                } else if (kind == "f") {
                    *reinterpret_cast<float*>(slot) = std::strtof(text.c_str(), nullptr);
                } else if (kind == "d") {
                    *reinterpret_cast<double*>(slot) = std::strtod(text.c_str(), nullptr);
                } else {
                    return 3;
                }
                argv_[i] = slot;
            }
            cuda_host_entries().at(sym)(g[0], g[1], g[2], b[0], b[1], b[2], argv_.data());
        } else {
            return 4;
        }
    }
    for (std::size_t id = 0; id < buffers.size(); ++id) {
        std::ofstream out(dir + "/out" + std::to_string(id) + ".bin", std::ios::binary);
        out.write(buffers[id].data(), buffers[id].size() - 16);
    }
    return 0;
}
