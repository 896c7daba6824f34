/*
 * thp-exec: run a program with a given THP policy and a parent-death signal.
 *
 *     thp-exec DISABLE PARENT [nofile=SOFT] PROGRAM [ARG...]
 *
 * DISABLE is 0 or 1 (PR_SET_THP_DISABLE), PARENT the pid that must still be our
 * parent once PR_SET_PDEATHSIG (SIGKILL) is set: if it is already gone the
 * program is not run. nofile=SOFT gives the program that soft RLIMIT_NOFILE (the
 * limit the shim was started with: the shim raises its own, as Go programs do,
 * and its children get the original back; see shim/common/nofile.py). PROGRAM is
 * looked up in PATH.
 *
 * Why a program of its own: the shim runs with THP disabled from birth (the
 * launcher set PR_SET_THP_DISABLE, inherited across fork and exec), but runc
 * and the containers it creates must get the host's policy. A preexec_fn could
 * set both flags in the forked child, but it forces subprocess to fork() the
 * whole interpreter (page tables of a 30-50 MiB heap, at-fork handlers, Python
 * code in a child of a process with worker threads): ~3-4 ms per runc call on
 * the machines measured, and unsafe with threads. With this step subprocess
 * uses vfork(), the child runs no Python at all, and the two prctl calls happen
 * here, between two execs. Both flags survive execve(2).
 *
 * Exit status 127 with a message on stderr when it cannot run PROGRAM.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

static int fail(const char *what, const char *detail)
{
    fprintf(stderr, "thp-exec: %s: %s\n", what, detail);
    return 127;
}

/* Lower the soft open-file limit to SOFT (never above the hard limit). */
static int restore_nofile(const char *arg)
{
    char *end;
    long soft = strtol(arg, &end, 10);
    struct rlimit rl;

    if (*arg == '\0' || *end != '\0' || soft <= 0)
        return fail("nofile", arg);
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return fail("getrlimit", strerror(errno));
    if ((rlim_t)soft < rl.rlim_max)
        rl.rlim_cur = (rlim_t)soft;
    else
        rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return fail("setrlimit", strerror(errno));
    return 0;
}

int main(int argc, char **argv)
{
    char *end;
    long parent;
    int program = 3;

    if (argc < 4 || (strcmp(argv[1], "0") != 0 && strcmp(argv[1], "1") != 0))
        return fail("usage", "thp-exec 0|1 PARENT [nofile=SOFT] PROGRAM [ARG...]");
    parent = strtol(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0' || parent <= 0)
        return fail("parent pid", argv[2]);
    if (prctl(PR_SET_THP_DISABLE, argv[1][0] == '1', 0, 0, 0) != 0)
        return fail("PR_SET_THP_DISABLE", strerror(errno));
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        return fail("PR_SET_PDEATHSIG", strerror(errno));
    if (strncmp(argv[3], "nofile=", 7) == 0) {
        if (argc < 5 || restore_nofile(argv[3] + 7) != 0)
            return argc < 5 ? fail("usage", "thp-exec 0|1 PARENT [nofile=SOFT] PROGRAM [ARG...]") : 127;
        program = 4;
    }
    if (getppid() != (pid_t)parent)
        return fail("parent", "exited before the program could start");
    execvp(argv[program], argv + program);
    return fail(argv[program], strerror(errno));
}
