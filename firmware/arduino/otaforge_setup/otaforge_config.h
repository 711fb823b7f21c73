// otaforge_config.h: the personal settings of ONE device.
//
// This file is a template. The OTAForge platform replaces each placeholder
// (a name in double curly braces; each appears exactly once, below) by plain
// string replacement when it builds the setup firmware or a user's sketch,
// and puts the result next to the sketch. Nothing else in the firmware holds personal
// data, so the sketch itself can be shared freely.
//
// String values sit inside C string literals: the platform must escape
// backslash and double quote (as \\ and \") and refuse control characters.
// trigger_pin and check_interval_s are bare integers.
#pragma once

// Placeholder wifi_ssid: name (SSID) of the user's Wi-Fi network the board joins. Empty: the
// network is given over Improv Wi-Fi when the board is installed from the browser, and kept
// in the board's flash (every later firmware joins it from there).
#define OTAFORGE_WIFI_SSID "{{wifi_ssid}}"

// Placeholder wifi_password: WPA/WPA2 passphrase of that network ("" for an open network).
#define OTAFORGE_WIFI_PASSWORD "{{wifi_password}}"

// Placeholder firmware_url: the device's static download link, plain http, e.g.
// "http://otaforge.example.net/dl/bot_001/firmware.bin". The board GETs it
// with the stock update client; the server answers 304 when the version below
// is already the newest, 200 with the .bin otherwise.
#define OTAFORGE_FIRMWARE_URL "{{firmware_url}}"

// Placeholder device_id: the device ID registered on the platform (e.g. "bot_001");
// sent as the user name of HTTP Basic authentication on the download link.
#define OTAFORGE_DEVICE_ID "{{device_id}}"

// Placeholder device_password: the device's password registered on the platform
// (e.g. "12345"); sent as the password of HTTP Basic authentication.
#define OTAFORGE_DEVICE_PASSWORD "{{device_password}}"

// Placeholder workspace_url: the device's workspace on the platform; the setup firmware
// names it over Improv Wi-Fi once the board is on the network, as where to go next.
#define OTAFORGE_WORKSPACE_URL "{{workspace_url}}"

// Placeholder trigger_pin: GPIO of the trigger button, active LOW with the internal
// pull-up (default 0: the BOOT/FLASH button on most ESP32 and ESP8266 boards).
// Use -1 for no button (timer only).
#define OTAFORGE_TRIGGER_PIN {{trigger_pin}}

// Placeholder check_interval_s: seconds between automatic checks of the download
// link (default 3600). 0 turns the timer off (button only).
#define OTAFORGE_CHECK_INTERVAL_S {{check_interval_s}}

// Placeholder firmware_version: version string of the firmware being built; sent as
// x-ESP32-version / x-ESP8266-version so the server can answer 304 "no update".
// Must be non-empty and different for every build, or the board would
// download the same image again at every check.
#define OTAFORGE_FIRMWARE_VERSION "{{firmware_version}}"

// Optional settings (not placeholders); uncomment to change the defaults.
// #define OTAFORGE_LED_PIN 2              // LED blinked while flashing; -1 = none (default)
// #define OTAFORGE_LED_ON HIGH            // level that lights that LED
// #define OTAFORGE_FIRST_CHECK_S 30       // first automatic check after Wi-Fi is up; 0 = wait a full interval
// #define OTAFORGE_WIFI_WAIT_MS 10000     // how long otaforge_begin() waits for Wi-Fi
// #define OTAFORGE_LOG Serial             // where the [otaforge] log lines go
