/*
 * The VM tests' workload: one static binary whose behaviour the boot config picks (PROBE_MODE),
 * printing one "probe: ..." line per finding on the console, so a few boots check many things.
 *
 *   checks  crash twice (exit 3; restart policy on-failure), then on the third run: show the
 *           boot config, reach the host through the user network (DHCP lease in use), send
 *           garbage to the control socket, ask health with the token, leave an orphan behind,
 *           count zombies, and exit 0 (on_exit = poweroff ends the VM).
 *   wait    print the boot config, then wait for SIGTERM (the power button) and say so.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SOCKET_PATH "/var/lib/easyenclave/agent.sock"
#define COUNTER "/tmp/probe-runs"

static void say(const char *fmt, const char *a) {
    printf("probe: ");
    printf(fmt, a);
    printf("\n");
    fflush(stdout);
}

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v ? v : "(unset)";
}

static int runs_so_far(void) {
    int n = 0;
    FILE *f = fopen(COUNTER, "r");
    if (f) {
        if (fscanf(f, "%d", &n) != 1) n = 0;
        fclose(f);
    }
    f = fopen(COUNTER, "w");
    if (f) {
        fprintf(f, "%d\n", n + 1);
        fclose(f);
    }
    return n;
}

static int unix_connect(void) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, SOCKET_PATH);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        close(s);
        return -1;
    }
    return s;
}

/* Send bytes, read one answer line into buf. */
static int exchange(const char *req, size_t len, char *buf, size_t cap) {
    int s = unix_connect();
    if (s < 0) return -1;
    if (write(s, req, len) != (ssize_t)len) {
        close(s);
        return -1;
    }
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(s, buf + n, 1);
        if (r <= 0 || buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    close(s);
    return (int)n;
}

static void reach_host(void) {
    const char *host = getenv("PROBE_HOST");
    const char *port = getenv("PROBE_PORT");
    if (!host || !port) {
        say("host check skipped (%s)", "PROBE_HOST/PROBE_PORT unset");
        return;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        say("host unreachable: %s", strerror(errno));
    } else {
        const char *msg = "hello from the guest\n";
        if (write(s, msg, strlen(msg)) > 0) say("host reached at %s", host);
    }
    close(s);
}

static int count_zombies(void) {
    int zombies = 0;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], stat[512];
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, stat, sizeof stat - 1);
        close(fd);
        if (n <= 0) continue;
        stat[n] = 0;
        char *p = strrchr(stat, ')');
        if (p && p[1] == ' ' && p[2] == 'Z') zombies++;
    }
    if (d) closedir(d);
    return zombies;
}

static volatile sig_atomic_t stop;
static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

int main(void) {
    const char *mode = env("PROBE_MODE");
    say("mode %s", mode);
    say("greeting %s", env("GREETING"));
    if (strcmp(mode, "wait") == 0) {
        signal(SIGTERM, on_term);
        say("waiting for %s", "SIGTERM");
        while (!stop) pause();
        say("got %s", "SIGTERM");
        return 0;
    }
    int run = runs_so_far();
    char num[16];
    snprintf(num, sizeof num, "%d", run);
    say("run %s", num);
    if (run < 2) {
        say("crashing on purpose (run %s)", num);
        return 3;
    }
    reach_host();
    char answer[4096];
    const char garbage[] = "\xff\xfe{{{ not json\n";
    int got = exchange(garbage, sizeof garbage - 1, answer, sizeof answer);
    if (got > 0 && strstr(answer, "\"ok\":false")) {
        char *code = strstr(answer, "\"code\":");
        say("garbage refused %s", code ? code : answer);
    } else {
        say("garbage answer: %s", got > 0 ? answer : "(none)");
    }
    char req[512];
    int n = snprintf(req, sizeof req, "{\"method\":\"health\",\"token\":\"%s\"}\n", env("EE_TOKEN"));
    if (exchange(req, (size_t)n, answer, sizeof answer) > 0 && strstr(answer, "\"ok\":true"))
        say("health ok after garbage%s", "");
    else
        say("health failed: %s", answer);
    /* An orphan: a grandchild that outlives its parent and is reparented to PID 1. */
    pid_t child = fork();
    if (child == 0) {
        if (fork() == 0) {
            usleep(300000);
            _exit(0);
        }
        _exit(0);
    }
    waitpid(child, NULL, 0);
    usleep(1500000);
    snprintf(num, sizeof num, "%d", count_zombies());
    say("zombies %s", num);
    say("done%s", "");
    return 0;
}
