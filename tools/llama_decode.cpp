// llama_decode: greedy decoding of a fixed prompt through llama.cpp's C API (llama.h), for
// tools/pi_proxy.sh, which counts the instructions it executes under qemu-aarch64 next to edgekv's
// C driver (tests/c/run_model.c) on the same GGUF file.
//
//   llama_decode MODEL.gguf --ids FILE [--steps N] [--threads N] [--batch N] [--kv f16|q8_0|q4_0]
//                [--fa on|off|auto]
//
// FILE holds the prompt's token ids (whitespace separated; tools/pi_proxy.sh writes the ids edgekv's
// own tokenizer gives, so both engines see the same prompt). The prompt goes through llama_decode in
// batches of --batch tokens (default 64, as run_model); then N-1 one-token decode steps follow, so
// N tokens come out, the first from the prefill, each chosen by argmax over the logits, like
// run_model. Prints "tokens: t0 t1 ..." and a line naming the context settings used; llama.cpp's
// own lines about flash attention go to stderr (they say what --fa auto chose).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "llama.h"

// warnings and errors, and llama.cpp's lines about flash attention (what --fa auto resolved to)
static void quiet_log(enum ggml_log_level level, const char *text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN || strstr(text, "flash_attn") || strstr(text, "Flash Attention")) fputs(text, stderr);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: llama_decode MODEL.gguf --ids FILE [--steps N] [--threads N] [--batch N] "
                        "[--kv f16|q8_0|q4_0] [--fa on|off|auto]\n");
        return 2;
    }
    const char *ids_path = nullptr;
    int steps = 16, threads = 1, batch = 64;
    std::string kv = "f16", fa = "auto";
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const bool more = i + 1 < argc;
        if (!strcmp(a, "--ids") && more) ids_path = argv[++i];
        else if (!strcmp(a, "--steps") && more) steps = atoi(argv[++i]);
        else if (!strcmp(a, "--threads") && more) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--batch") && more) batch = atoi(argv[++i]);
        else if (!strcmp(a, "--kv") && more) kv = argv[++i];
        else if (!strcmp(a, "--fa") && more) fa = argv[++i];
        else { fprintf(stderr, "llama_decode: unknown or incomplete option %s\n", a); return 2; }
    }
    if (!ids_path || steps < 1 || batch < 1) { fprintf(stderr, "llama_decode: --ids FILE needed, --steps/--batch >= 1\n"); return 2; }
    std::vector<llama_token> prompt;
    {
        FILE *f = fopen(ids_path, "r");
        if (!f) { fprintf(stderr, "llama_decode: cannot open %s\n", ids_path); return 1; }
        long v;
        while (fscanf(f, "%ld", &v) == 1) prompt.push_back((llama_token)v);
        fclose(f);
    }
    if (prompt.empty()) { fprintf(stderr, "llama_decode: no ids in %s\n", ids_path); return 1; }

    ggml_type kv_type;
    if (kv == "f16") kv_type = GGML_TYPE_F16;
    else if (kv == "q8_0") kv_type = GGML_TYPE_Q8_0;
    else if (kv == "q4_0") kv_type = GGML_TYPE_Q4_0;
    else { fprintf(stderr, "llama_decode: --kv f16|q8_0|q4_0\n"); return 2; }
    llama_flash_attn_type fa_type;
    if (fa == "on") fa_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    else if (fa == "off") fa_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    else if (fa == "auto") fa_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    else { fprintf(stderr, "llama_decode: --fa on|off|auto\n"); return 2; }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "llama_decode: cannot load %s\n", argv[1]); return 1; }
    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(prompt.size() + steps + 8);
    cp.n_batch = (uint32_t)batch;
    cp.n_ubatch = (uint32_t)batch;
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = kv_type;
    cp.type_v = kv_type;
    cp.flash_attn_type = fa_type;
    cp.no_perf = true;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "llama_decode: cannot create a context (kv %s, fa %s)\n", kv.c_str(), fa.c_str()); return 1; }

    std::vector<llama_token> out;
    int status = 0;
    for (size_t i = 0; i < prompt.size() && status == 0; i += (size_t)batch) {
        const int n = (int)std::min(prompt.size() - i, (size_t)batch);
        if (llama_decode(ctx, llama_batch_get_one(prompt.data() + i, n))) status = 1;
    }
    while (status == 0) {
        llama_token tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        out.push_back(tok);
        if ((int)out.size() == steps) break;
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1))) status = 1;
    }
    if (status) fprintf(stderr, "llama_decode: llama_decode failed\n");
    printf("context: n_ctx %u, n_batch %d, threads %d, kv %s, flash_attn %s, prompt %zu tokens\n",
           llama_n_ctx(ctx), batch, threads, kv.c_str(), fa.c_str(), prompt.size());
    printf("tokens:");
    for (llama_token t : out) printf(" %d", t);
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return status;
}
