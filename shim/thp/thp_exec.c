/*
 * thp-exec: run a program with a given THP policy and a parent-death signal.
 *
 *     thp-exec DISABLE PARENT PROGRAM [ARG...]
 *
 * DISABLE is 0 or 1 (PR_SET_THP_DISABLE), PARENT the pid that must still be our
 * parent once PR_SET_PDEATHSIG (SIGKILL) is set: if it is already gone the
 * program is not run. PROGRAM is looked up in PATH.
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
#include <unistd.h>

static int fail(const char *what, const char *detail)
{
    fprintf(stderr, "thp-exec: %s: %s\n", what, detail);
    return 127;
}

int main(int argc, char **argv)
{
    char *end;
    long parent;

    if (argc < 4 || (strcmp(argv[1], "0") != 0 && strcmp(argv[1], "1") != 0))
        return fail("usage", "thp-exec 0|1 PARENT PROGRAM [ARG...]");
    parent = strtol(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0' || parent <= 0)
        return fail("parent pid", argv[2]);
    if (prctl(PR_SET_THP_DISABLE, argv[1][0] == '1', 0, 0, 0) != 0)
        return fail("PR_SET_THP_DISABLE", strerror(errno));
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        return fail("PR_SET_PDEATHSIG", strerror(errno));
    if (getppid() != (pid_t)parent)
        return fail("parent", "exited before the program could start");
    execvp(argv[3], argv + 3);
    return fail(argv[3], strerror(errno));
}
