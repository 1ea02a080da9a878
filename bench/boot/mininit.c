/* The boot benchmark's baseline: the smallest init that runs the same workload. No mounts, no
 * modules, no network: fork, exec /app/workload, wait, power off. */
#include <sys/reboot.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {"/app/workload", NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    waitpid(pid, &status, 0);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
