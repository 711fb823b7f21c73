// OTAForge setup firmware: flashed ONCE over USB/serial.
//
// It joins the user's Wi-Fi and checks the device's static download link
//  - when the trigger button is pressed (GPIO0 = BOOT/FLASH by default), and
//  - on a timer (30 s after Wi-Fi comes up, then every OTAFORGE_CHECK_INTERVAL_S),
// with the stock update client (ESP32: HTTPUpdate, ESP8266: ESP8266httpUpdate).
// When the platform has compiled newer firmware for this device, the board
// downloads it, flashes it into the other OTA slot and reboots into it.
// Every sketch the platform compiles includes otaforge_ota.h too, so the new
// firmware keeps this ability.
//
// All personal settings live in otaforge_config.h (filled in by the platform).
// Build: arduino-cli compile --fqbn esp32:esp32:esp32 --library ../otaforge_ota otaforge_setup
//        (or copy otaforge_ota.h next to this file); see ../README.md.

#include "otaforge_config.h"  // personal settings: Wi-Fi, link, device ID/password
#include "otaforge_ota.h"     // otaforge_begin() / otaforge_loop()

void setup() {
  Serial.begin(115200);
  delay(200);  // let the USB serial settle so the first lines are not lost
  Serial.println();
  Serial.println(F("OTAForge setup firmware"));
#if defined(ESP32)
  Serial.printf("chip %s rev %d, flash %u bytes, free OTA space %u bytes\r\n",
                ESP.getChipModel(), (int)ESP.getChipRevision(),
                (unsigned)ESP.getFlashChipSize(), (unsigned)ESP.getFreeSketchSpace());
#elif defined(ESP8266)
  Serial.printf("chip id %u, flash %u bytes, free OTA space %u bytes\r\n",
                (unsigned)ESP.getChipId(), (unsigned)ESP.getFlashChipRealSize(),
                (unsigned)ESP.getFreeSketchSpace());
#endif
  otaforge_begin();
}

void loop() {
  otaforge_loop();
  delay(10);  // nothing else to do; keeps the button sampling at ~100 Hz
}
