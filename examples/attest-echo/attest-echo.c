/*
 * attest-echo: the demo workload. Listens on TCP 8080; for each connection it reads one line
 * holding a hex nonce, asks the EasyEnclave Mini control socket for a quote whose report data is
 * SHA-512(nonce bytes), and answers one JSON line:
 *
 *   {"ok":true,"nonce":"<hex>","report_data":"<hex of SHA-512>","attest":<the socket's answer>}
 *
 * The socket's answer carries quote_b64, the runtime event log and the CC event log. Static,
 * libc only; SHA-512 is implemented here (FIPS 180-4) so the workload needs nothing else.
 *
 *   attest-echo [PORT]          serve (default 8080)
 *   attest-echo --sha512 HEX    print SHA-512 of the bytes HEX encodes (self-test)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_NONCE_HEX 1024          /* 512 bytes of nonce is plenty */
#define MAX_ANSWER (1 << 20)        /* the socket's attest answer: quote + event logs */
#define DEFAULT_SOCKET "/var/lib/easyenclave/agent.sock"

/* ---- SHA-512, FIPS 180-4 section 6.4 ---- */

static const uint64_t K[80] = {
    0x428a2f98d728ae22ULL, 0x7137449123ef65cdULL, 0xb5c0fbcfec4d3b2fULL,
    0xe9b5dba58189dbbcULL, 0x3956c25bf348b538ULL, 0x59f111f1b605d019ULL,
    0x923f82a4af194f9bULL, 0xab1c5ed5da6d8118ULL, 0xd807aa98a3030242ULL,
    0x12835b0145706fbeULL, 0x243185be4ee4b28cULL, 0x550c7dc3d5ffb4e2ULL,
    0x72be5d74f27b896fULL, 0x80deb1fe3b1696b1ULL, 0x9bdc06a725c71235ULL,
    0xc19bf174cf692694ULL, 0xe49b69c19ef14ad2ULL, 0xefbe4786384f25e3ULL,
    0x0fc19dc68b8cd5b5ULL, 0x240ca1cc77ac9c65ULL, 0x2de92c6f592b0275ULL,
    0x4a7484aa6ea6e483ULL, 0x5cb0a9dcbd41fbd4ULL, 0x76f988da831153b5ULL,
    0x983e5152ee66dfabULL, 0xa831c66d2db43210ULL, 0xb00327c898fb213fULL,
    0xbf597fc7beef0ee4ULL, 0xc6e00bf33da88fc2ULL, 0xd5a79147930aa725ULL,
    0x06ca6351e003826fULL, 0x142929670a0e6e70ULL, 0x27b70a8546d22ffcULL,
    0x2e1b21385c26c926ULL, 0x4d2c6dfc5ac42aedULL, 0x53380d139d95b3dfULL,
    0x650a73548baf63deULL, 0x766a0abb3c77b2a8ULL, 0x81c2c92e47edaee6ULL,
    0x92722c851482353bULL, 0xa2bfe8a14cf10364ULL, 0xa81a664bbc423001ULL,
    0xc24b8b70d0f89791ULL, 0xc76c51a30654be30ULL, 0xd192e819d6ef5218ULL,
    0xd69906245565a910ULL, 0xf40e35855771202aULL, 0x106aa07032bbd1b8ULL,
    0x19a4c116b8d2d0c8ULL, 0x1e376c085141ab53ULL, 0x2748774cdf8eeb99ULL,
    0x34b0bcb5e19b48a8ULL, 0x391c0cb3c5c95a63ULL, 0x4ed8aa4ae3418acbULL,
    0x5b9cca4f7763e373ULL, 0x682e6ff3d6b2b8a3ULL, 0x748f82ee5defb2fcULL,
    0x78a5636f43172f60ULL, 0x84c87814a1f0ab72ULL, 0x8cc702081a6439ecULL,
    0x90befffa23631e28ULL, 0xa4506cebde82bde9ULL, 0xbef9a3f7b2c67915ULL,
    0xc67178f2e372532bULL, 0xca273eceea26619cULL, 0xd186b8c721c0c207ULL,
    0xeada7dd6cde0eb1eULL, 0xf57d4f7fee6ed178ULL, 0x06f067aa72176fbaULL,
    0x0a637dc5a2c898a6ULL, 0x113f9804bef90daeULL, 0x1b710b35131c471bULL,
    0x28db77f523047d84ULL, 0x32caab7b40c72493ULL, 0x3c9ebe0a15c9bebcULL,
    0x431d67c49c100d4cULL, 0x4cc5d4becb3e42b6ULL, 0x597f299cfc657e2aULL,
    0x5fcb6fab3ad6faecULL, 0x6c44198c4a475817ULL,
};
static const uint64_t H0[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};
typedef struct {
    uint64_t h[8];
    uint8_t block[128];
    size_t used;
    uint64_t bytes;
} sha512_ctx;

#define ROTR(x, n) (((x) >> (n)) | ((x) << (64 - (n))))

static void sha512_compress(sha512_ctx *c, const uint8_t *p) {
    uint64_t w[80], a, b, d, e, f, g, h, cc, t1, t2;
    for (int i = 0; i < 16; i++) {
        w[i] = 0;
        for (int j = 0; j < 8; j++) w[i] = (w[i] << 8) | p[i * 8 + j];
    }
    for (int i = 16; i < 80; i++) {
        uint64_t s0 = ROTR(w[i - 15], 1) ^ ROTR(w[i - 15], 8) ^ (w[i - 15] >> 7);
        uint64_t s1 = ROTR(w[i - 2], 19) ^ ROTR(w[i - 2], 61) ^ (w[i - 2] >> 6);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3];
    e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
    for (int i = 0; i < 80; i++) {
        t1 = h + (ROTR(e, 14) ^ ROTR(e, 18) ^ ROTR(e, 41)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROTR(a, 28) ^ ROTR(a, 34) ^ ROTR(a, 39)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g; g = f; f = e; e = d + t1; d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha512_init(sha512_ctx *c) {
    memcpy(c->h, H0, sizeof c->h);
    c->used = 0;
    c->bytes = 0;
}

static void sha512_update(sha512_ctx *c, const uint8_t *p, size_t n) {
    c->bytes += n;
    while (n > 0) {
        size_t take = 128 - c->used < n ? 128 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used == 128) {
            sha512_compress(c, c->block);
            c->used = 0;
        }
    }
}

static void sha512_final(sha512_ctx *c, uint8_t out[64]) {
    uint64_t bits = c->bytes * 8;
    uint8_t pad = 0x80, zero = 0, len[16] = {0};
    sha512_update(c, &pad, 1);
    while (c->used != 112) sha512_update(c, &zero, 1);
    for (int i = 0; i < 8; i++) len[15 - i] = (uint8_t)(bits >> (8 * i)); /* 128-bit length, high half 0 */
    sha512_update(c, len, 16);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) out[i * 8 + j] = (uint8_t)(c->h[i] >> (56 - 8 * j));
}

/* ---- small helpers ---- */

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Decode hex into out; returns the byte count or -1 when the text is not an even run of hex digits. */
static long unhex(const char *s, size_t n, uint8_t *out) {
    if (n == 0 || n % 2) return -1;
    for (size_t i = 0; i < n; i += 2) {
        int hi = hexval(s[i]), lo = hexval(s[i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    return (long)(n / 2);
}

static void tohex(const uint8_t *p, size_t n, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = 0;
}

static void base64(const uint8_t *p, size_t n, char *out) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        out[o++] = a[v >> 18 & 63];
        out[o++] = a[v >> 12 & 63];
        out[o++] = i + 1 < n ? a[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? a[v & 63] : '=';
    }
    out[o] = 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read one line (without the newline) into a malloc'd buffer of at most max bytes; NULL on error. */
static char *read_line(int fd, size_t max, size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (n >= max) break;
        if (n == cap) {
            if (cap >= max) break;
            cap *= 2;
            char *bigger = realloc(buf, cap);
            if (!bigger) break;
            buf = bigger;
        }
        ssize_t r = read(fd, buf + n, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        if (buf[n] == '\n') {
            buf[n] = 0;
            *len = n;
            return buf;
        }
        n++;
    }
    free(buf);
    return NULL;
}

static void reply_error(int fd, const char *message) {
    char out[512];
    int n = snprintf(out, sizeof out, "{\"ok\":false,\"error\":\"%s\"}\n", message);
    write_all(fd, out, (size_t)n);
}

/* ---- the control socket ---- */

static char *attest(const uint8_t report_data[64], const char **why) {
    const char *token = getenv("EE_TOKEN");
    const char *path = getenv("EE_SOCKET_PATH");
    if (!token) {
        *why = "EE_TOKEN is not set (the spec must say inherit_token = true)";
        return NULL;
    }
    if (!path) path = DEFAULT_SOCKET;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(path) >= sizeof addr.sun_path) {
        *why = "cannot create the control socket connection";
        if (s >= 0) close(s);
        return NULL;
    }
    strcpy(addr.sun_path, path);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        *why = "cannot connect to the control socket";
        close(s);
        return NULL;
    }
    char b64[89];
    base64(report_data, 64, b64);
    size_t cap = strlen(token) + 200;
    char *req = malloc(cap);
    if (!req) {
        close(s);
        *why = "out of memory";
        return NULL;
    }
    /* The token is hex from the runtime: no JSON escaping needed, but refuse anything else. */
    for (const char *t = token; *t; t++)
        if (hexval(*t) < 0) {
            free(req);
            close(s);
            *why = "EE_TOKEN is not hex";
            return NULL;
        }
    int n = snprintf(req, cap, "{\"method\":\"attest\",\"token\":\"%s\",\"report_data_b64\":\"%s\"}\n", token, b64);
    int bad = write_all(s, req, (size_t)n);
    free(req);
    size_t len = 0;
    char *answer = bad ? NULL : read_line(s, MAX_ANSWER, &len);
    close(s);
    if (!answer || len == 0 || answer[0] != '{') {
        free(answer);
        *why = "no answer from the control socket";
        return NULL;
    }
    return answer;
}

static void serve_one(int c) {
    struct timeval tv = {.tv_sec = 10};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t len = 0;
    char *line = read_line(c, MAX_NONCE_HEX + 2, &len);
    if (!line) {
        reply_error(c, "send one line: a hex nonce of at most 1024 hex digits");
        return;
    }
    if (len && line[len - 1] == '\r') line[--len] = 0;
    if (len > MAX_NONCE_HEX) {
        free(line);
        reply_error(c, "send one line: a hex nonce of at most 1024 hex digits");
        return;
    }
    uint8_t nonce[MAX_NONCE_HEX / 2], digest[64];
    long n = unhex(line, len, nonce);
    if (n < 0) {
        free(line);
        reply_error(c, "the nonce must be an even number of hex digits");
        return;
    }
    sha512_ctx ctx;
    sha512_init(&ctx);
    sha512_update(&ctx, nonce, (size_t)n);
    sha512_final(&ctx, digest);
    const char *why = NULL;
    char *answer = attest(digest, &why);
    if (!answer) {
        free(line);
        reply_error(c, why);
        return;
    }
    char rd[129];
    tohex(digest, 64, rd);
    char head[MAX_NONCE_HEX + 256];
    int h = snprintf(head, sizeof head, "{\"ok\":true,\"nonce\":\"%s\",\"report_data\":\"%s\",\"attest\":", line, rd);
    if (write_all(c, head, (size_t)h) == 0 && write_all(c, answer, strlen(answer)) == 0) write_all(c, "}\n", 2);
    printf("attest-echo: answered a %ld-byte nonce with a quote\n", n);
    fflush(stdout);
    free(answer);
    free(line);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--sha512") == 0) {
        size_t len = strlen(argv[2]);
        uint8_t *buf = malloc(len / 2 + 1), digest[64];
        char hex[129];
        long n = len == 0 ? 0 : unhex(argv[2], len, buf);
        if (n < 0) {
            fprintf(stderr, "attest-echo: not hex\n");
            return 2;
        }
        sha512_ctx ctx;
        sha512_init(&ctx);
        sha512_update(&ctx, buf, (size_t)n);
        sha512_final(&ctx, digest);
        tohex(digest, 64, hex);
        printf("%s\n", hex);
        return 0;
    }
    int port = argc > 1 ? atoi(argv[1]) : 8080;
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "attest-echo: bad port %s\n", argv[1]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 16) < 0) {
        fprintf(stderr, "attest-echo: cannot listen on port %d: %s\n", port, strerror(errno));
        return 1;
    }
    printf("attest-echo: listening on port %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        serve_one(c);
        close(c);
    }
}
