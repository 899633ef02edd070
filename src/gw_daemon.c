/*
 * gw_daemon.c - background mode, RLIMIT_NOFILE and the privilege drop, see
 * gw_daemon.h.
 *
 * -d uses one fork, not the classic two: after setsid() the child is a
 * session leader, and it never opens a terminal (every open here is
 * O_NOCTTY or a regular file), so it cannot acquire one. The parent stays
 * until the child writes one byte on a pipe once it is ready, so a script
 * or Type=forking unit that runs "gatherd -d" learns whether the start
 * worked from the exit status, as with nginx's master.
 */
#include "gw_daemon.h"

#include "gw_log.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int ready_fd = -1; /* the child's end of the pipe; -1: not detached */

int
gw_daemon_detach(const char *error_log, char *err, size_t errlen)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "-d: pipe: %s", strerror(errno));
        return GW_ERR;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "-d: fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return GW_ERR;
    }
    if (pid > 0) { /* the parent: wait for the child's word, then leave */
        close(p[1]);
        char c;
        ssize_t n;
        do
            n = read(p[0], &c, 1);
        while (n < 0 && errno == EINTR);
        if (n == 1)
            _exit(0);
        int status = 0;
        waitpid(pid, &status, 0); /* it died before it was ready: reap it */
        if (WIFSIGNALED(status))
            fprintf(stderr, "gatherd: the daemon died of signal %d during start-up\n", WTERMSIG(status));
        else if (error_log)
            fprintf(stderr, "gatherd: the daemon failed to start; the reason is in %s\n", error_log);
        _exit(1);
    }
    close(p[0]);
    ready_fd = p[1];
    if (setsid() < 0) {
        snprintf(err, errlen, "-d: setsid: %s", strerror(errno));
        return GW_ERR;
    }
    umask(022);
    return GW_OK;
}

/* Points fd at /dev/null. */
static void
to_null(int fd)
{
    int n = open("/dev/null", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (n < 0)
        return;
    if (n != fd) {
        dup2(n, fd);
        close(n);
    }
}

void
gw_daemon_ready(bool keep_stderr)
{
    if (ready_fd < 0)
        return;
    to_null(STDIN_FILENO);
    to_null(STDOUT_FILENO);
    if (!keep_stderr)
        to_null(STDERR_FILENO);
    char c = 1;
    ssize_t n;
    do
        n = write(ready_fd, &c, 1);
    while (n < 0 && errno == EINTR);
    close(ready_fd);
    ready_fd = -1;
}

/* File descriptors cfg can use at once: clients, backend pools, listeners
 * and a margin for log files, resolver and admin sockets. */
static rlim_t
nofile_need(const gw_config_t *cfg)
{
    unsigned long w = (unsigned long)cfg->workers;
    unsigned long need = cfg->max_connections;      /* clients, all workers together */
    for (size_t i = 0; i < cfg->nbackends; i++)     /* every worker has its own pool per server */
        need += (unsigned long)cfg->backends[i]->max_connections * cfg->backends[i]->nservers * w;
    need += cfg->nlisten * w + cfg->nadmin;         /* one SO_REUSEPORT socket per worker */
    return need + 64 + 4 * w;                       /* logs, resolver, epoll, wake-up pipes, admin clients */
}

/* fs.nr_open: the ceiling of any hard limit; 1048576 when unreadable. */
static rlim_t
nr_open(void)
{
    unsigned long v = 1048576;
    FILE *f = fopen("/proc/sys/fs/nr_open", "re");
    if (f) {
        if (fscanf(f, "%lu", &v) != 1)
            v = 1048576;
        fclose(f);
    }
    return (rlim_t)v;
}

void
gw_daemon_raise_nofile(const gw_config_t *cfg)
{
    rlim_t need = nofile_need(cfg);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        gw_log(GW_LOG_WARN, "getrlimit(RLIMIT_NOFILE): %s", strerror(errno));
        return;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
        return;
    rlim_t before = rl.rlim_cur;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need && geteuid() == 0) {
        /* root may raise the ceiling, up to fs.nr_open, with CAP_SYS_RESOURCE */
        rlim_t cap = nr_open();
        struct rlimit up = { .rlim_cur = rl.rlim_max, .rlim_max = need < cap ? need : cap };
        if (setrlimit(RLIMIT_NOFILE, &up) == 0)
            rl = up;
    }
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need ? need : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 && getrlimit(RLIMIT_NOFILE, &rl) != 0)
        rl.rlim_cur = before;
    if (rl.rlim_cur >= need) {
        gw_log(GW_LOG_INFO, "open files limit raised from %lu to %lu", (unsigned long)before,
               (unsigned long)rl.rlim_cur);
        return;
    }
    gw_log(GW_LOG_WARN,
           "open files limit is %lu (hard limit %lu) but this configuration can use %lu descriptors "
           "(max_connections %u + backend pools x %d workers + listeners); beyond the limit new "
           "connections fail with EMFILE. Raise it: LimitNOFILE= in the systemd unit, \"ulimit -Hn\" "
           "in the starting shell, or docker run --ulimit nofile=%lu:%lu",
           (unsigned long)rl.rlim_cur, (unsigned long)rl.rlim_max, (unsigned long)need, cfg->max_connections,
           cfg->workers, (unsigned long)need, (unsigned long)need);
}

/* Hands a log file to the new user so SIGUSR1 can reopen it. */
static int
chown_log(const char *path, uid_t uid, gid_t gid, char *err, size_t errlen)
{
    if (path == NULL || chown(path, uid, gid) == 0)
        return GW_OK;
    snprintf(err, errlen, "cannot give the log file %s to uid %ld: %s", path, (long)uid, strerror(errno));
    return GW_ERR;
}

int
gw_daemon_drop_privileges(const gw_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->user == NULL)
        return GW_OK;
    if (geteuid() != 0) {
        if (geteuid() != cfg->uid || getegid() != cfg->gid)
            gw_log(GW_LOG_WARN, "\"user\": \"%s\" ignored: not started as root, running as uid %ld gid %ld",
                   cfg->user, (long)geteuid(), (long)getegid());
        return GW_OK;
    }
    if (chown_log(cfg->log.error_path, cfg->uid, cfg->gid, err, errlen) != GW_OK ||
        chown_log(cfg->log.access_path, cfg->uid, cfg->gid, err, errlen) != GW_OK)
        return GW_ERR;
    /* A named user gets its supplementary groups; a bare uid only its group. */
    struct passwd *pw = getpwnam(cfg->user);
    int rc = pw && pw->pw_uid == cfg->uid ? initgroups(cfg->user, cfg->gid) : setgroups(1, &cfg->gid);
    if (rc != 0) {
        snprintf(err, errlen, "\"user\": setting the groups of %s: %s", cfg->user, strerror(errno));
        return GW_ERR;
    }
    if (setgid(cfg->gid) != 0) {
        snprintf(err, errlen, "\"group\": setgid(%ld): %s", (long)cfg->gid, strerror(errno));
        return GW_ERR;
    }
    if (setuid(cfg->uid) != 0) {
        snprintf(err, errlen, "\"user\": setuid(%ld): %s", (long)cfg->uid, strerror(errno));
        return GW_ERR;
    }
    if (cfg->uid != 0 && setuid(0) == 0) {
        snprintf(err, errlen, "\"user\": root could be regained after switching to %s", cfg->user);
        return GW_ERR;
    }
    gw_log(GW_LOG_NOTICE, "running as user %s (uid %ld, gid %ld)", cfg->user, (long)cfg->uid, (long)cfg->gid);
    return GW_OK;
}
