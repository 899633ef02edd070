/*
 * gw_daemon.h - what a Unix daemon does around the gateway itself: going to
 * the background (-d), raising the open-files limit to what the
 * configuration needs, and giving up root after binding ("user", "group").
 *
 * Main thread only, in this order (gw_main.c):
 *   gw_daemon_detach()          before any thread exists (fork keeps one);
 *   gw_daemon_raise_nofile()    before the listeners and pools are made;
 *   gw_daemon_drop_privileges() after every socket is bound and the pid
 *                               file written, before the first request;
 *   gw_daemon_ready()           when start-up is complete.
 */
#ifndef GW_DAEMON_H
#define GW_DAEMON_H

#include "gw_config.h"
#include "gw_core.h"

/*
 * -d: forks; the parent waits until the child calls gw_daemon_ready() and
 * exits 0, or exits 1 when the child dies first (its reason is already on
 * stderr, or in error_log, a file the parent then names). The child becomes a session leader without
 * a controlling terminal and returns GW_OK. The working directory is kept,
 * so relative paths in the configuration keep their meaning. GW_ERR with
 * the reason in err when the fork or the pipe fails (nothing changed).
 */
int gw_daemon_detach(const char *error_log, char *err, size_t errlen);

/*
 * Start-up is complete: after -d the waiting parent is released, and
 * stdin and stdout go to /dev/null, stderr too unless keep_stderr (the
 * error log still goes there). A no-op without -d.
 */
void gw_daemon_ready(bool keep_stderr);

/*
 * Raises the soft RLIMIT_NOFILE to the descriptors cfg can use at once
 * (clients, backend pools per worker, listeners, a margin), within the
 * hard limit (as root the hard limit is raised too, up to fs.nr_open).
 * Logs a warning with the numbers and the remedy when the limit stays
 * below the need; never fails the start.
 */
void gw_daemon_raise_nofile(const gw_config_t *cfg);

/*
 * "user"/"group": switches the whole process (every thread: glibc's
 * setuid applies to all) to cfg->uid/cfg->gid with only that group (or the
 * user's groups from /etc/group when "user" is a name), after handing the
 * log files to that user so SIGUSR1 can reopen them. GW_OK when there is
 * nothing to do; a warning when not root (the switch is impossible, the
 * daemon runs on as it is); GW_ERR with the reason in err when a step
 * fails or root could be regained.
 */
int gw_daemon_drop_privileges(const gw_config_t *cfg, char *err, size_t errlen);

#endif
