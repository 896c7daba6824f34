/*
 * start-relay: hand a `start` to the warm template instead of starting an interpreter.
 *
 *     start-relay N PYTHON ARGS... SHIM-ARGS...
 *
 * PYTHON ARGS... SHIM-ARGS... is the Python launcher's command line, exactly as the
 * bin script would exec it (it is written there, only there), its first N words
 * before containerd's arguments to the shim (SHIM-ARGS).
 *
 * bin/containerd-shim-runc-v2-py runs this for the `start` action. A fresh
 * Python interpreter costs ~20-30 ms before the launcher's first line runs;
 * the template (shim/template/server.py) has all of it imported already. So
 * this program, which knows nothing of containerd, sends the template what a
 * launcher process would have had: its arguments, environment, working
 * directory, parent pid (containerd) and THP setting, plus its stdin, stdout
 * and stderr (SCM_RIGHTS). The template forks a child that runs the same
 * launcher code (shim/launch/launcher.py) on them and reports its exit status.
 *
 * Two phases, as with the template's shim forks: the template answers with the
 * child's pid, and the child does nothing until it reads "go", written here
 * only when that answer came in time. Whenever there is no usable answer (no
 * template, a stopped or stale one, anything unexpected), nothing has happened
 * yet and this program execs the ordinary launcher: that command line.
 *
 * The template's socket is <dir>/py-template-<key>, key = FNV-1a 64 of
 * "PYTHON\0ADDRESS" (shim/launch/template_client.py computes the same);
 * dir is /run/containerd/s, or $SHIM_PY_TEMPLATE_DIR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define ANSWER_TIMEOUT_MS 1000
#define MAX_MESSAGE (1 << 20)

extern char **environ;

static void fallback(char **command)
{
    execv(command[0], command);
    fprintf(stderr, "start failed: exec %s: %s\n", command[0], strerror(errno));
    _exit(1);
}

static uint64_t fnv1a(uint64_t h, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* The value of Go-style flag NAME (-NAME V, --NAME V, -NAME=V) before the first positional
 * (the flags as shim/launch/cli.py parses them: debug, v and info take no value). */
static const char *flag_value(char **args, const char *name)
{
    static const char *const bools[] = {"debug", "v", "info", NULL};
    size_t len = strlen(name);
    for (int i = 0; args[i]; i++) {
        const char *a = args[i];
        if (a[0] != '-' || strcmp(a, "-") == 0 || strcmp(a, "--") == 0)
            return NULL;
        a += (a[1] == '-') ? 2 : 1;
        const char *eq = strchr(a, '=');
        size_t n = eq ? (size_t)(eq - a) : strlen(a);
        if (n == len && strncmp(a, name, len) == 0)
            return eq ? eq + 1 : args[i + 1];
        if (eq)
            continue;
        int is_bool = 0;
        for (int b = 0; bools[b]; b++)
            is_bool |= strlen(bools[b]) == n && strncmp(a, bools[b], n) == 0;
        if (!is_bool && args[i + 1])
            i++; /* its value */
    }
    return NULL;
}

struct buf {
    char *data;
    size_t len;
};

static int put(struct buf *b, const char *s)
{
    size_t n = strlen(s) + 1;
    if (b->len + n > MAX_MESSAGE)
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

int main(int argc, char **argv)
{
    char *end;
    long words = argc > 2 ? strtol(argv[1], &end, 10) : 0;
    if (argc < 3 || *end || words < 1 || words > argc - 2) {
        fprintf(stderr, "usage: start-relay N PYTHON ARGS... SHIM-ARGS...\n");
        return 2;
    }
    char **relayed = argv + 2; /* the launcher's command line */
    char **shim_args = relayed + words;
    int nshim = argc - 2 - (int)words;
    const char *disabled = getenv("SHIM_PY_TEMPLATE");
    if (disabled && strcmp(disabled, "0") == 0)
        fallback(relayed);
    const char *address = flag_value(shim_args, "address");
    if (!address)
        fallback(relayed);

    const char *dir = getenv("SHIM_PY_TEMPLATE_DIR");
    if (!dir || !*dir)
        dir = "/run/containerd/s";
    uint64_t key = fnv1a(14695981039346656037ULL, relayed[0], strlen(relayed[0]) + 1);
    key = fnv1a(key, address, strlen(address));
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(sa.sun_path, sizeof sa.sun_path, "%s/py-template-%016llx", dir,
                         (unsigned long long)key) >= sizeof sa.sun_path)
        fallback(relayed);
    int conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (conn < 0 || connect(conn, (struct sockaddr *)&sa, sizeof sa) != 0)
        fallback(relayed);

    /* launch \0 ppid \0 thp \0 cwd \0 nargs \0 args... \0 env... */
    struct buf msg = {malloc(MAX_MESSAGE), 0};
    char num[32], cwd[4096];
    int thp = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    if (!msg.data || thp < 0 || !getcwd(cwd, sizeof cwd))
        fallback(relayed);
    int bad = put(&msg, "launch");
    snprintf(num, sizeof num, "%d", (int)getppid());
    bad |= put(&msg, num);
    bad |= put(&msg, thp ? "1" : "0");
    bad |= put(&msg, cwd);
    snprintf(num, sizeof num, "%d", nshim);
    bad |= put(&msg, num);
    for (int i = 0; i < nshim; i++)
        bad |= put(&msg, shim_args[i]);
    for (char **e = environ; *e; e++)
        bad |= put(&msg, *e);
    if (bad)
        fallback(relayed);

    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {msg.data, msg.len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                        .msg_controllen = sizeof control};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    if (sendmsg(conn, &mh, MSG_NOSIGNAL) != (ssize_t)msg.len)
        fallback(relayed);

    /* Phase 1: the child's pid, in time; anything else means nothing was started. */
    struct pollfd p = {conn, POLLIN, 0};
    char answer[64];
    if (poll(&p, 1, ANSWER_TIMEOUT_MS) != 1)
        fallback(relayed);
    ssize_t n = recv(conn, answer, sizeof answer - 1, 0);
    if (n <= 0)
        fallback(relayed);
    answer[n] = '\0';
    if (strspn(answer, "0123456789") != (size_t)n || atoi(answer) <= 0)
        fallback(relayed); /* "late", "stale", a refusal: the template started nothing */
    /* Phase 2: let it run; its exit status is ours. */
    if (send(conn, "go", 2, MSG_NOSIGNAL) != 2) {
        fprintf(stderr, "start failed: the warm template went away\n");
        return 1;
    }
    unsigned char status;
    do {
        n = recv(conn, &status, 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n != 1) {
        fprintf(stderr, "start failed: the launcher in the warm template ended without a status\n");
        return 1;
    }
    return status;
}
