// The OTAForge update header: every ESP sketch built here keeps the update ability
// (otaforge_ota.h is linked in and wraps setup() and loop()), so the board fetches new
// firmware from its link when the trigger button is pressed or the timer runs out.
// A sketch can also ask at a moment it chooses: here, when "update" arrives on the serial
// monitor (115200 baud).
#include "otaforge_ota.h"

void setup() {
  Serial.begin(115200);
  Serial.println("type 'update' to check for new firmware now");
}

void loop() {
  if (Serial.available()) {
    String line = Serial.readStringUntil('\n');
    line.trim();
    if (line == "update") {
      // Returns HTTP_UPDATE_NO_UPDATES when the link answers 304; on an update the board
      // reboots into the new firmware and this call does not return.
      t_httpUpdate_return r = otaforge_check_now();
      Serial.printf("update check: %d\n", (int)r);
    }
  }
}
