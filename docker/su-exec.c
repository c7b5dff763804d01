/*
 * su-exec USER[:GROUP] COMMAND [ARGS...]
 *
 * Switch to USER (name or uid) and GROUP (name or gid; default: USER's primary group), drop
 * every supplementary group, set HOME, then execvp COMMAND: no fork, so COMMAND keeps the PID
 * (PID 1 in a container) and receives the signals. The same job as gosu in the official
 * postgres images. /etc/passwd and /etc/group are parsed by hand so the static binary needs
 * no NSS modules. Built by docker/build_images.py with `gcc -static -Os`.
 */
#define _GNU_SOURCE
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Find NAME (or the numeric id in NAME) in an /etc/passwd-style FILE. */
static int lookup(const char *file, const char *name, long *id, long *gid, char *home, size_t n) {
    char line[1024];
    char *end;
    long numeric = strtol(name, &end, 10);
    int is_number = *name != '\0' && *end == '\0';
    FILE *f = fopen(file, "r");
    if (f == NULL) return is_number ? (*id = numeric, 0) : -1;
    while (fgets(line, sizeof line, f) != NULL) {
        char *fields[7] = {0};
        char *p = line;
        int i = 0;
        line[strcspn(line, "\n")] = '\0';
        for (; i < 7 && (fields[i] = strsep(&p, ":")) != NULL; i++) {}
        if (i < 3) continue;
        if (is_number ? strtol(fields[2], NULL, 10) != numeric : strcmp(fields[0], name) != 0)
            continue;
        *id = strtol(fields[2], NULL, 10);
        if (gid != NULL && i >= 4) *gid = strtol(fields[3], NULL, 10);
        if (home != NULL && i >= 6) snprintf(home, n, "%s", fields[5]);
        fclose(f);
        return 0;
    }
    fclose(f);
    return is_number ? (*id = numeric, 0) : -1;
}

int main(int argc, char *argv[]) {
    char spec[256], home[512] = "/";
    char *group;
    long uid = -1, gid = -1;
    if (argc < 3) {
        fprintf(stderr, "usage: %s USER[:GROUP] COMMAND [ARGS...]\n", argv[0]);
        return 64;
    }
    snprintf(spec, sizeof spec, "%s", argv[1]);
    group = strchr(spec, ':');
    if (group != NULL) *group++ = '\0';
    if (lookup("/etc/passwd", spec, &uid, &gid, home, sizeof home) != 0) {
        fprintf(stderr, "su-exec: unknown user %s\n", spec);
        return 67;
    }
    if (group != NULL && *group != '\0' && lookup("/etc/group", group, &gid, NULL, NULL, 0) != 0) {
        fprintf(stderr, "su-exec: unknown group %s\n", group);
        return 67;
    }
    if (gid < 0) gid = uid;
    if (setgroups(0, NULL) != 0 || setgid((gid_t)gid) != 0 || setuid((uid_t)uid) != 0) {
        perror("su-exec: dropping privileges (needs CAP_SETUID and CAP_SETGID)");
        return 1;
    }
    setenv("HOME", home, 1);
    execvp(argv[2], argv + 2);
    fprintf(stderr, "su-exec: cannot run %s: ", argv[2]);
    perror(NULL);
    return 127;
}
