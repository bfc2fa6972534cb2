// Token-level driver for a Verilated LlamaChip (see sim/chip_sim.py).
//
// Line protocol on stdin/stdout, one command per line:
//   T <id>     feed one token; answers "O <next> <cycles>" or "E token|context <cycles>"
//   G <id> <n> feed <id>, then feed back each argmax n-1 more times; one "O"/"E" line per token
//   R          reset_ctx pulse; answers "R <pos>"
//   I          read the ID ROM; answers "I w0 w1 ... w63" (hex)
//   P          answers "P <pos> <busy> <err_token> <err_context> <total cycles>"
//   Q          quit
// Built with -DHW_LORA (a chip with the LoRA loader ports lora_in/lora_cmd/lora_status):
//   B <hex>    stream these image bytes on lora_in, one a cycle; answers "B <n bytes>"
//   C <code>   send one LoraCmd (0 BEGIN, 1 COMMIT, 2 ENABLE, 3 DISABLE, 4 LOCK) on lora_cmd,
//              then run 4 idle cycles (a pending switch happens at this boundary); answers
//              "C <status>" with lora_status as a decimal number
//   S          answers "S <status>"
// (Verilator spells Amaranth's "token_in__valid" as "token_in___05Fvalid".)
// <cycles> of a token: from the cycle whose rising edge transfers it into the chip to the
// first cycle token_out.valid is high (the chip's cycles_per_token, measured the way the cocotb
// chip bench does); for an error, from the first cycle the token is offered.
//
// Speed: the model is evaluated twice per clock (falling and rising edge) and once more only
// after the driver changes an input; everything else is C++ with no VPI, and a whole token
// runs without talking to the host. The chip is wrapped in SimTop (registered reset): it
// leaves reset one cycle after rst falls.
//
// Built with --trace-fst or --trace, "--trace FILE" writes an FST or VCD waveform.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "Vchip.h"
#include "verilated.h"
#if VM_TRACE_FST
#include "verilated_fst_c.h"
typedef VerilatedFstC Tracer;
#elif VM_TRACE
#include "verilated_vcd_c.h"
typedef VerilatedVcdC Tracer;
#endif

static VerilatedContext* ctx;
static Vchip* top;
#if VM_TRACE
static Tracer* tfp = nullptr;
#endif
static uint64_t total_cycles = 0;
static const uint64_t TIMEOUT = 50000000ULL;

static void half(int clk) {
    top->clk = clk;
    top->eval();
#if VM_TRACE
    if (tfp) tfp->dump(ctx->time());
#endif
    ctx->timeInc(5);
}

// One clock cycle; inputs must be set before the call. Returns after the rising edge.
static void cycle() {
    half(0);
    half(1);
    total_cycles++;
}

// Let a change of the inputs reach the outputs (combinational paths) before the next edge.
// Not needed after cycle(): its rising-edge evaluation leaves the outputs settled.
static void settle() {
    top->clk = 0;
    top->eval();
}

static void feed(uint32_t tok, uint32_t* out, int* kind, uint64_t* cycles) {
    uint8_t et0 = top->err_token, ec0 = top->err_context;
    uint64_t start = total_cycles;
    top->token_in___05Fpayload = tok;
    top->token_in___05Fvalid = 1;
    top->token_out___05Fready = 0;
    settle();
    for (;;) {
        bool fire = top->token_in___05Fready;
        cycle();
        if (fire) break;
        if (total_cycles - start > TIMEOUT) { *kind = 3; *cycles = total_cycles - start; return; }
    }
    uint64_t t_in = total_cycles - 1;   // the transfer cycle
    top->token_in___05Fvalid = 0;
    top->token_out___05Fready = 1;
    settle();
    for (;;) {
        if (top->token_out___05Fvalid) {
            *out = top->token_out___05Fpayload;
            *kind = 0;
            *cycles = total_cycles - t_in;
            cycle();
            top->token_out___05Fready = 0;
            settle();
            return;
        }
        if (top->err_token && !et0) { *kind = 1; *cycles = total_cycles - start; return; }
        if (top->err_context && !ec0) { *kind = 2; *cycles = total_cycles - start; return; }
        cycle();
        if (total_cycles - start > TIMEOUT) { *kind = 3; *cycles = total_cycles - start; return; }
    }
}

#ifdef HW_LORA
static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Stream the bytes spelled in hex by `text` on lora_in; returns the count, or -1 for bad hex
// or a loader that is not ready within 1000 cycles.
static long lora_bytes(const char* text) {
    long n = 0;
    while (*text == ' ') text++;
    for (;;) {
        int hi = hexval(text[0]);
        if (hi < 0) break;
        int lo = hexval(text[1]);
        if (lo < 0) return -1;
        text += 2;
        top->lora_in___05Fpayload = (uint8_t)(hi << 4 | lo);
        top->lora_in___05Fvalid = 1;
        settle();
        int waited = 0;
        while (!top->lora_in___05Fready) {
            cycle();
            if (++waited > 1000) { top->lora_in___05Fvalid = 0; settle(); return -1; }
        }
        cycle();
        n++;
    }
    top->lora_in___05Fvalid = 0;
    settle();
    return n;
}

// One LoraCmd on lora_cmd (held until taken), then 4 idle cycles; -1 if not taken.
static int lora_cmd(unsigned code) {
    top->lora_cmd___05Fpayload = code;
    top->lora_cmd___05Fvalid = 1;
    settle();
    int waited = 0;
    while (!top->lora_cmd___05Fready) {
        cycle();
        if (++waited > 1000) { top->lora_cmd___05Fvalid = 0; settle(); return -1; }
    }
    cycle();
    top->lora_cmd___05Fvalid = 0;
    settle();
    for (int i = 0; i < 4; i++) cycle();
    settle();
    return 0;
}
#endif

static void report(int kind, uint32_t out, uint64_t cycles) {
    static const char* names[] = {"", "token", "context", "timeout"};
    if (kind == 0)
        printf("O %u %llu\n", out, (unsigned long long)cycles);
    else
        printf("E %s %llu\n", names[kind], (unsigned long long)cycles);
}

int main(int argc, char** argv) {
    ctx = new VerilatedContext;
    const char* trace_file = nullptr;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--trace")) trace_file = argv[i + 1];
    top = new Vchip{ctx};
#if VM_TRACE
    if (trace_file) {
        ctx->traceEverOn(true);
        tfp = new Tracer;
        top->trace(tfp, 99);
        tfp->open(trace_file);
    }
#else
    if (trace_file) {
        fprintf(stderr, "this simulation was built without tracing\n");
        return 2;
    }
#endif
    top->rst = 1;
    top->token_in___05Fvalid = 0;
    top->token_out___05Fready = 0;
    top->reset_ctx = 0;
    top->id_addr = 0;
#ifdef HW_LORA
    top->lora_in___05Fvalid = 0;
    top->lora_cmd___05Fvalid = 0;
#endif
    for (int i = 0; i < 4; i++) cycle();
    top->rst = 0;
    cycle();
    cycle();    // the registered reset falls one cycle later
    settle();
    printf("READY\n");
    fflush(stdout);

    static char line[1 << 16];
    while (fgets(line, sizeof line, stdin)) {
        char cmd = line[0];
        if (cmd == 'Q') break;
#ifdef HW_LORA
        if (cmd == 'B') {
            printf("B %ld\n", lora_bytes(line + 1));
            fflush(stdout);
            continue;
        }
        if (cmd == 'C') {
            unsigned code = 0;
            sscanf(line + 1, "%u", &code);
            int r = lora_cmd(code);
            printf("C %ld\n", r < 0 ? -1L : (long)top->lora_status);
            fflush(stdout);
            continue;
        }
        if (cmd == 'S') {
            settle();
            printf("S %lu\n", (unsigned long)top->lora_status);
            fflush(stdout);
            continue;
        }
#endif
        if (cmd == 'T' || cmd == 'G') {
            unsigned long tok = 0, n = 1;
            if (cmd == 'T') sscanf(line + 1, "%lu", &tok);
            else sscanf(line + 1, "%lu %lu", &tok, &n);
            for (unsigned long k = 0; k < n; k++) {
                uint32_t out = 0;
                int kind = 0;
                uint64_t cyc = 0;
                feed((uint32_t)tok, &out, &kind, &cyc);
                report(kind, out, cyc);
                if (kind) break;
                tok = out;
            }
        } else if (cmd == 'R') {
            top->reset_ctx = 1;
            cycle();
            top->reset_ctx = 0;
            cycle();
            printf("R %u\n", (unsigned)top->pos);
        } else if (cmd == 'I') {
            printf("I");
            for (int a = 0; a < 64; a++) {
                top->id_addr = a;
                settle();
                cycle();
                settle();
                printf(" %08x", (unsigned)top->id_data);
            }
            printf("\n");
        } else if (cmd == 'P') {
            settle();
            printf("P %u %u %u %u %llu\n", (unsigned)top->pos, (unsigned)top->busy,
                   (unsigned)top->err_token, (unsigned)top->err_context,
                   (unsigned long long)total_cycles);
        } else {
            printf("? %s", line);
        }
        fflush(stdout);
    }
#if VM_TRACE
    if (tfp) tfp->close();
#endif
    top->final();
    delete top;
    delete ctx;
    return 0;
}
