/* Test workload for tests/test_measured_boot_vm.py: mount securityfs, then print the firmware's
 * TPM event log (and the kernel command line) in hex on stdout, which the guest runtime forwards
 * to the serial console. Built with `gcc -static -Os` by the test (the builder takes static ELFs
 * only); the test also runs it as /init of a bare initramfs. The lines look like "EE-TPMLOG <hex>", between EE-TPMLOG-BEGIN and EE-TPMLOG-END. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <unistd.h>

static void dump(const char *tag, const char *path) {
    unsigned char buf[64];
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("%s-ERROR %s: %s\n", tag, path, strerror(errno));
        return;
    }
    printf("%s-BEGIN\n", tag);
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        printf("%s ", tag);
        for (ssize_t i = 0; i < n; i++)
            printf("%02x", buf[i]);
        printf("\n");
    }
    printf("%s-END\n", tag);
    close(fd);
}

int main(void) {
    /* As /init of a bare initramfs (the harness check in the test), mount what we read ourselves. */
    if (getpid() == 1) {
        mount("proc", "/proc", "proc", 0, NULL);
        mount("sysfs", "/sys", "sysfs", 0, NULL);
    }
    if (mount("securityfs", "/sys/kernel/security", "securityfs", 0, NULL) != 0 && errno != EBUSY)
        printf("EE-TPMLOG-ERROR mount securityfs: %s\n", strerror(errno));
    dump("EE-TPMLOG", "/sys/kernel/security/tpm0/binary_bios_measurements");
    dump("EE-CMDLINE", "/proc/cmdline");
    fflush(stdout);
    if (getpid() == 1) {
        sync();
        reboot(RB_POWER_OFF);
    }
    return 0;
}
