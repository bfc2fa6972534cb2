// Board simulation driver: a Verilated BoardCore (UART + host link + chip, see
// fpga/board.py) whose UART pins are bridged to a pseudo-terminal, so that a host program
// (`hardwire chat --port <pty>`, fpga/host.py) talks to it exactly as to a ULX3S.
//
// The simulator drives the design clock directly (no PLL: the simulation-only clock path);
// the design is wrapped in SimTop (registered reset, see sim/verilated.py).
// Bytes the host writes to the pty are serialized onto `uart_rx` (8N1, --cpb clocks per bit,
// back to back); `uart_tx` is sampled in the middle of each bit and every byte received is
// written to the pty.
//
// Time: while anything is happening (bytes in flight either way, or LED 0 "busy" lit) and
// for --active-tail clocks after that, the clock runs flat out (so the host link's
// inter-byte timeout expires promptly after a truncated frame or garbage); when the design
// is idle the driver advances --idle-cycles clocks at a time and then waits for pty input
// ten times as long as that took (at least 1 ms), so an idle simulation uses about a tenth
// of a core at most.
//
// Prints "PTY <path>" and then "READY" on stdout; runs until SIGINT/SIGTERM or until stdin
// reaches end of file when started with --stdin-eof-quits.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>

#include <fcntl.h>
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include "Vboard.h"
#include "verilated.h"

static volatile sig_atomic_t stop_requested = 0;
static void on_signal(int) { stop_requested = 1; }

static VerilatedContext* ctx;
static Vboard* top;
static uint64_t cycles = 0;

static void cycle() {
    top->clk = 0;
    top->eval();
    ctx->timeInc(5);
    top->clk = 1;
    top->eval();
    ctx->timeInc(5);
    cycles++;
}

// Host -> design: 8N1 serializer onto uart_rx.
struct Serializer {
    int cpb;
    std::deque<uint8_t> queue;
    int bit = -1;        // -1 idle; 0 start; 1..8 data; 9 stop
    int timer = 0;
    uint8_t cur = 0;
    bool busy() const { return bit >= 0 || !queue.empty(); }
    int line() const {
        if (bit < 0) return 1;
        if (bit == 0) return 0;
        if (bit <= 8) return (cur >> (bit - 1)) & 1;
        return 1;
    }
    void step() {        // called once per cycle, before the clock edge
        if (bit < 0) {
            if (queue.empty()) return;
            cur = queue.front();
            queue.pop_front();
            bit = 0;         // the start bit: on the line from this cycle, for cpb cycles
            timer = cpb;
            return;
        }
        if (--timer == 0) {
            bit++;
            timer = cpb;
            if (bit > 9) bit = -1;
        }
    }
};

// Design -> host: 8N1 deserializer sampling uart_tx mid-bit.
struct Deserializer {
    int cpb;
    int state = -1;      // -1 idle; 0 start; 1..8 data; 9 stop
    int timer = 0;
    uint8_t shreg = 0;
    bool busy() const { return state >= 0; }
    // returns a byte (0..255) when one completes, else -1
    int step(int line) {
        if (state < 0) {
            if (line == 0) {
                state = 0;
                timer = cpb / 2;
            }
            return -1;
        }
        if (--timer > 0) return -1;
        timer = cpb;
        if (state == 0) {
            if (line != 0) { state = -1; return -1; }   // glitch
            state = 1;
            return -1;
        }
        if (state <= 8) {
            shreg = (uint8_t)((shreg >> 1) | (line ? 0x80 : 0));
            state++;
            return -1;
        }
        state = -1;      // stop bit (a framing error would show as a bad frame upstream)
        return shreg;
    }
};

int main(int argc, char** argv) {
    int cpb = 8;
    long idle_cycles = 256;
    long active_tail = 0;
    bool stdin_quits = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cpb") && i + 1 < argc) cpb = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--idle-cycles") && i + 1 < argc) idle_cycles = atol(argv[++i]);
        else if (!strcmp(argv[i], "--active-tail") && i + 1 < argc) active_tail = atol(argv[++i]);
        else if (!strcmp(argv[i], "--stdin-eof-quits")) stdin_quits = true;
    }
    if (cpb < 4) { fprintf(stderr, "--cpb must be at least 4\n"); return 2; }

    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) || unlockpt(master)) {
        perror("posix_openpt");
        return 1;
    }
    const char* slave_name = ptsname(master);
    // Keep a slave descriptor open ourselves: the master then never sees a hangup (EIO)
    // when clients come and go.
    int keep = open(slave_name, O_RDWR | O_NOCTTY);
    struct termios tio;
    if (keep >= 0 && tcgetattr(keep, &tio) == 0) {
        cfmakeraw(&tio);
        tcsetattr(keep, TCSANOW, &tio);
    }
    fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    ctx = new VerilatedContext;
    top = new Vboard{ctx};
    top->rst = 1;
    top->uart_rx = 1;
    for (int i = 0; i < 8; i++) cycle();
    top->rst = 0;
    cycle();
    cycle();    // the design's reset is registered (SimTop): it falls one cycle later

    printf("PTY %s\nREADY\n", slave_name);
    fflush(stdout);

    Serializer ser{cpb};
    Deserializer des{cpb};
    std::string out;     // bytes for the host not yet written
    uint8_t buf[4096];
    uint64_t bytes_in = 0, bytes_out = 0;

    long tail = 0;       // clocks still to run flat out after the last activity
    while (!stop_requested) {
        bool active = ser.busy() || des.busy() || !out.empty() || (top->led & 1);
        if (active) tail = active_tail;
        long batch = (active || tail > 0) ? 4096 : idle_cycles;
        if (!active) tail = std::max(0L, tail - batch);
        auto t0 = std::chrono::steady_clock::now();
        for (long k = 0; k < batch; k++) {
            ser.step();
            top->uart_rx = ser.line();
            cycle();
            int b = des.step(top->uart_tx);
            if (b >= 0) {
                out.push_back((char)b);
                bytes_out++;
            }
        }
        struct pollfd fds[2] = {{master, POLLIN, 0}, {0, POLLIN, 0}};
        int nfds = stdin_quits ? 2 : 1;
        active = ser.busy() || des.busy() || !out.empty() || (top->led & 1) || tail > 0;
        // idle: wait ten times as long as the batch took (at least 1 ms), so an idle
        // simulation uses at most ~10% of a core however large the design
        long took_us = std::chrono::duration_cast<std::chrono::microseconds>(
            std::chrono::steady_clock::now() - t0).count();
        int wait_ms = active ? 0 : (int)std::max(1L, std::min(200L, took_us / 100));
        int r = poll(fds, nfds, wait_ms);
        if (r > 0 && (fds[0].revents & POLLIN)) {
            ssize_t n = read(master, buf, sizeof buf);
            for (ssize_t i = 0; i < n; i++) ser.queue.push_back(buf[i]);
            if (n > 0) bytes_in += n;
        }
        if (stdin_quits && r > 0 && (fds[1].revents & (POLLIN | POLLHUP))) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0) break;
        }
        if (!out.empty()) {
            ssize_t n = write(master, out.data(), out.size());
            if (n > 0) out.erase(0, (size_t)n);
            if (out.size() > (1u << 20)) out.erase(0, out.size() - (1u << 20));
        }
    }
    fprintf(stderr, "board simulation stopped after %llu cycles (%llu bytes in, %llu out)\n",
            (unsigned long long)cycles, (unsigned long long)bytes_in,
            (unsigned long long)bytes_out);
    top->final();
    delete top;
    delete ctx;
    close(keep);
    close(master);
    return 0;
}
