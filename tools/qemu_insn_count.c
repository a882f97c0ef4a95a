/* qemu_insn_count: a qemu TCG plugin that counts the guest instructions a program executes.
 *
 *   cc -O2 -shared -fPIC -o qemu_insn_count.so tools/qemu_insn_count.c
 *   qemu-aarch64 -plugin ./qemu_insn_count.so,out=counts.txt[,sym=per_symbol.txt] -L /usr/aarch64-linux-gnu PROGRAM ARGS...
 *
 * At exit it writes one line "insns N vcpus V" (N executed guest instructions, V vCPUs = guest
 * threads seen) to the file named by out=PATH, or to stderr without it. With sym=PATH it also writes
 * the count per function to PATH, "COUNT SYMBOL" per line, largest first: each block is charged to
 * the symbol of its first instruction (qemu's lookup in the guest's ELF symbol table; "?" where
 * there is none). Each translated block gets
 * an inline "add the block's instruction count to a counter" op, so the count is exact for a block
 * that runs to its end. A block left early by an exception (a fault, a syscall in the middle) still
 * counts whole; for compute-bound code that is noise far below one part in a million. The inline op
 * is not atomic: with several guest threads running at once (V > 1) increments can be lost, so use
 * single-threaded guests for exact counts (the line names V so a reader can tell).
 *
 * Written against qemu's plugin API version 1, as in qemu 7.2 (Debian 12's qemu-user 7.2 is
 * built with plugin support but ships no plugins). The few declarations it uses are written out
 * below rather than included, so that the file builds without qemu's source tree; their signatures
 * are those of include/qemu/qemu-plugin.h in qemu 7.2.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

/* ---- the plugin API, version 1 (declarations of the functions qemu exports) ---- */
typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* only passed by pointer here */
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_simple_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_simple_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn;
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const char *qemu_plugin_insn_symbol(const struct qemu_plugin_insn *insn);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;
EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv);
/* ---- end of the API declarations ---- */

static uint64_t insn_count;     /* bumped by the inline ops qemu emits into each block */
static unsigned int max_vcpu;   /* highest vCPU index seen + 1 (guest threads, in user mode) */
static char *out_path, *sym_path;

/* sym=PATH: one counter per symbol, in an open-addressing table keyed by name */
#define SYM_SLOTS 65536
typedef struct { const char *name; uint64_t count; } sym_slot;
static sym_slot *syms;
static pthread_mutex_t sym_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t *sym_counter(const char *name) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *c = name; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
    for (size_t i = 0; i < SYM_SLOTS; i++) {
        sym_slot *s = &syms[(h + i) % SYM_SLOTS];
        if (!s->name) { s->name = strdup(name); return &s->count; }
        if (!strcmp(s->name, name)) return &s->count;
    }
    return NULL; /* table full: the block counts in the total only */
}

static int by_count_desc(const void *a, const void *b) {
    const sym_slot *x = a, *y = b;
    return x->count < y->count ? 1 : x->count > y->count ? -1 : 0;
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index) {
    (void)id;
    if (vcpu_index + 1 > max_vcpu) max_vcpu = vcpu_index + 1;
}

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    const uint64_t n = (uint64_t)qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
    if (syms && n > 0) {
        const char *name = qemu_plugin_insn_symbol(qemu_plugin_tb_get_insn(tb, 0));
        pthread_mutex_lock(&sym_lock);
        uint64_t *c = sym_counter(name ? name : "?");
        pthread_mutex_unlock(&sym_lock);
        if (c) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, c, n);
    }
}

static void on_plugin_exit(qemu_plugin_id_t id, void *userdata) {
    (void)id; (void)userdata;
    FILE *f = out_path ? fopen(out_path, "w") : NULL;
    if (out_path && !f) fprintf(stderr, "qemu_insn_count: cannot write %s\n", out_path);
    fprintf(f ? f : stderr, "insns %llu vcpus %u\n", (unsigned long long)insn_count, max_vcpu);
    if (f) fclose(f);
    if (syms) {
        FILE *g = fopen(sym_path, "w");
        if (!g) { fprintf(stderr, "qemu_insn_count: cannot write %s\n", sym_path); return; }
        qsort(syms, SYM_SLOTS, sizeof *syms, by_count_desc);
        for (size_t i = 0; i < SYM_SLOTS && syms[i].count; i++)
            fprintf(g, "%llu %s\n", (unsigned long long)syms[i].count, syms[i].name);
        fclose(g);
    }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4)) {
            out_path = strdup(argv[i] + 4);
        } else if (!strncmp(argv[i], "sym=", 4)) {
            sym_path = strdup(argv[i] + 4);
            syms = calloc(SYM_SLOTS, sizeof *syms);
            if (!syms) return 1;
        } else {
            fprintf(stderr, "qemu_insn_count: unknown argument '%s' (want out=PATH or sym=PATH)\n", argv[i]);
            return 1;
        }
    }
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
    qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
    return 0;
}
